"""``emflow demo``: generate a synthetic EM stack, ingest it, and say how to view it."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

DEMO_RECIPE = """\
# emflow demo recipe (generated): a synthetic, misaligned 8-bit EM stack
source:
  glob: slices/*.png
voxel_size_nm: [8, 8, 40]
output_dir: output
outputs:
  - format: precomputed
    name: em_jpeg
    encoding: jpeg
    jpeg_quality: 90
    sharded: true
  - format: omezarr
    name: em.ome.zarr
    version: "0.5"
align: {align}
enhance:
  clip_limit: 0.02          # CLAHE; 0 disables
"""


def demo(
    directory: Annotated[
        Path, typer.Argument(help="where to put slices, recipe and output")
    ] = Path("emflow-demo"),
    slices: Annotated[int, typer.Option(help="number of slices", min=1)] = 48,
    size: Annotated[int, typer.Option(help="slice width and height in px", min=1)] = 1024,
    workers: Annotated[int, typer.Option(help="local Dask workers (0 = serial)", min=0)] = 2,
    align: Annotated[
        bool, typer.Option("--align/--no-align", help="misalign the slices and align them back")
    ] = True,
) -> None:
    """Make a synthetic stack, run it through emflow, and print how to open the result.

    DIRECTORY must be new, empty, or an earlier demo's: the demo never writes into a
    folder of yours. Running it again with the same settings resumes (or finds it done).
    """
    from emflow.testing import synthetic_slices, write_stack
    from emflow.testing.misalign import misaligned_slices

    params = {"slices": slices, "size": size, "align": align}
    fresh = _claim_demo_folder(directory, params)
    src = directory / "slices"
    if fresh:
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        gen = synthetic_slices((slices, size, size), seed=0)
        if align:
            gen = misaligned_slices(gen, seed=0)
        write_stack(gen, src, pattern="slice_%04d.png")
        typer.echo(
            f"wrote {slices} synthetic slices of {size} × {size} px to {src} "
            f"({time.perf_counter() - t0:.1f} s)",
            err=True,
        )
    recipe = directory / "recipe.yaml"
    recipe.write_text(DEMO_RECIPE.format(align="true" if align else "false"))
    from emflow.cli import main

    args = ["run", str(recipe)] + (["--serial"] if workers == 0 else ["--workers", str(workers)])
    args += ["--restart"] if fresh else []
    code = main(args)  # its closing lines say what was written and how to view it
    if code:
        raise typer.Exit(code)


def _claim_demo_folder(directory: Path, params: dict) -> bool:
    """Make or reuse the demo folder; True when its slices must be (re)generated.

    Raises OutputError for an existing folder with other content than an earlier demo.
    """
    from emflow.errors import OutputError
    from emflow.io.ownership import MARKER, _empty_dir, read_marker

    marker = read_marker(directory)
    if marker is not None and marker.get("kind") == "demo":
        if marker.get("params") == params and (directory / "slices").is_dir():
            return False
    elif os.path.lexists(directory) and not _empty_dir(directory):
        raise OutputError(
            f"{directory} already exists and is not an emflow demo folder; the demo writes only "
            "into a new or empty folder: give another DIRECTORY"
        )
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"kind": "demo", "owner": uuid.uuid4().hex, "params": params}
    (directory / MARKER).write_text(json.dumps(payload))
    return True


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
