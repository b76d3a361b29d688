"""``emflow demo``: generate a synthetic EM stack, ingest it, and say how to view it."""

from __future__ import annotations

import time
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
    slices: Annotated[int, typer.Option(help="number of slices")] = 48,
    size: Annotated[int, typer.Option(help="slice width and height in px")] = 1024,
    workers: Annotated[int, typer.Option(help="local Dask workers (0 = serial)")] = 2,
    align: Annotated[
        bool, typer.Option("--align/--no-align", help="misalign the slices and align them back")
    ] = True,
) -> None:
    """Make a synthetic stack, run it through emflow, and print how to open the result."""
    from emflow.testing import synthetic_slices, write_stack
    from emflow.testing.misalign import misaligned_slices

    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "slices"
    t0 = time.perf_counter()
    gen = synthetic_slices((slices, size, size), seed=0)
    if align:
        gen = misaligned_slices(gen, seed=0)
    write_stack(gen, src, pattern="slice_%04d.png")
    typer.echo(
        f"wrote {slices} synthetic slices of {size} × {size} px to {src} ({time.perf_counter() - t0:.1f} s)",
        err=True,
    )
    recipe = directory / "recipe.yaml"
    recipe.write_text(DEMO_RECIPE.format(align="true" if align else "false"))
    from emflow.cli import main

    args = ["run", str(recipe)] + (["--serial"] if workers == 0 else ["--workers", str(workers)])
    code = main(args)
    if code:
        raise typer.Exit(code)
    out = (directory / "output").resolve()
    typer.echo(
        "\nview it:\n"
        f"  emflow serve {out}   (serves it with CORS and prints a neuroglancer link)\n"
        "  neuroglancer: precomputed://http://localhost:8000/em_jpeg  or  zarr://http://localhost:8000/em.ome.zarr\n"
        f"  napari / zarr: {out / 'em.ome.zarr'}"
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
