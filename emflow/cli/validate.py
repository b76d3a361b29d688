"""``emflow validate``: a full dry run: everything ``emflow run`` would refuse, refused first.

Prints the recipe with every default resolved (alignment on or off, and why), the
discovered stack, the planned pyramid, and what a run would do with the output
folder (start, resume, or refuse). Nothing is created or written.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer

from emflow.cli.options import (
    ClusterConfigOpt,
    ClusterOpt,
    InsecureOpt,
    MaxWorkersOpt,
    MemoryOpt,
    RecipeArg,
    ThreadsOpt,
    WorkersOpt,
    cluster_request,
)


def validate(
    recipe: RecipeArg,
    cluster: ClusterOpt = "local",
    cluster_config: ClusterConfigOpt = None,
    workers: WorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    threads: ThreadsOpt = None,
    memory: MemoryOpt = None,
    insecure: InsecureOpt = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="check as for 'emflow run --restart'")
    ] = False,
    alignment: Annotated[
        Path | None, typer.Option("--alignment", help="check this alignment.json as run would")
    ] = None,
    decode: Annotated[
        bool,
        typer.Option("--decode", help="also decode every slice (finds corrupt pixel data; slower)"),
    ] = False,
) -> None:
    """Check a recipe as 'emflow run' would, without writing anything; print what it resolves to."""
    from emflow.plan import plan_output
    from emflow.preflight import preflight
    from emflow.recipe import load_recipe

    r = load_recipe(recipe)
    req = cluster_request(
        r, cluster, cluster_config, workers, max_workers, threads, memory, insecure
    )
    check = preflight(r, restart=restart, alignment_path=alignment, cluster_request=req)
    if decode:
        _decode_all(check.catalog)
    typer.echo("# resolved recipe")
    typer.echo(r.to_yaml())
    typer.echo("# resolved defaults")
    why = "the default" if "align" not in r.model_fields_set else "set in the recipe"
    state = "on" if r.align.enabled else "off"
    if alignment is not None:
        state = f"from {alignment} (no matching)"
    typer.echo(f"align: {state} ({why}; 'align: false' turns it off)")
    typer.echo("# discovered stack")
    typer.echo(check.catalog.summary())
    typer.echo("# plan (alignment may enlarge the frame)")
    plan = plan_output(r, len(check.catalog.slices), check.catalog.shape_yx, check.catalog.dtype)
    typer.echo(plan.summary())
    typer.echo("# output")
    if check.resuming:
        what = f"resume the run in {check.run_dir} (same recipe, same stack)"
    elif check.restart and check.owner is not None:
        what = f"discard the earlier run in {check.run_dir} and start again (--restart)"
    else:
        what = f"start a new run in {check.run_dir}"
    typer.echo(
        f"emflow run would {what}; outputs: {', '.join(map(str, check.output_paths().values()))}"
    )
    for note in check.notes:
        typer.echo(note)
    typer.echo("ok: nothing was written")


def _decode_all(catalog) -> None:
    """Decode every source slice (threads); the first damaged file raises its SourceError."""
    from emflow.io.readers import read_image

    refs = [s for s in catalog.slices if s.path and s.fill is None]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(lambda s: read_image(s.path, s.page), refs):
            pass


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
