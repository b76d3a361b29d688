"""``emflow plan``: the work plan and the exact job script, without submitting anything."""

from __future__ import annotations

import json

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


def plan(
    recipe: RecipeArg,
    cluster: ClusterOpt = "local",
    cluster_config: ClusterConfigOpt = None,
    workers: WorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    threads: ThreadsOpt = None,
    memory: MemoryOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Print units per stage, planned memory per unit, and the job script a cluster would run."""
    from emflow import cluster as clusters
    from emflow.discover import discover_recipe
    from emflow.pipeline import plan_output
    from emflow.recipe import load_recipe

    r = load_recipe(recipe)
    cat = discover_recipe(r)
    from emflow.pipeline import RUN_FOLDER

    req = cluster_request(
        r,
        cluster,
        cluster_config,
        workers,
        max_workers,
        threads,
        memory,
        insecure,
        r.output_path / RUN_FOLDER / "worker-logs",
    )
    p = plan_output(r, len(cat.slices), cat.shape_yx, cat.dtype)
    typer.echo(cat.summary())
    typer.echo(p.summary())
    ny, nx = p.frame_shape_yx
    per_slice = ny * nx * ((2 if cat.dtype == "uint16" else 1) + 4)
    n = len(cat.slices)
    stages = []
    if r.align.enabled:
        stages += [("features", n), ("match", max(0, 2 * n - 3)), ("solve", 1)]
    stages.append(("slab", len(p.passes[0].blocks)))
    stages += [(f"coarse{q.index}", len(q.blocks)) for q in p.passes[1:]]
    typer.echo("units per stage: " + ", ".join(f"{s} {k}" for s, k in stages))
    typer.echo(
        f"planned memory per slab unit: {p.slab_depth * per_slice / 2**30:.2f} GiB "
        f"({p.slab_depth} slices of {nx} × {ny} px)"
    )
    typer.echo(f"cluster: {json.dumps(clusters.describe(req), default=str)}")
    script = clusters.job_script(req)
    if script:
        typer.echo("# job script that would be submitted (nothing was submitted):")
        typer.echo(script)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
