"""``emflow plan``: the work plan and the exact job script, without submitting anything."""

from __future__ import annotations

import json
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


def plan(
    recipe: RecipeArg,
    cluster: ClusterOpt = "local",
    cluster_config: ClusterConfigOpt = None,
    workers: WorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    threads: ThreadsOpt = None,
    memory: MemoryOpt = None,
    insecure: InsecureOpt = False,
    alignment: Annotated[
        Path | None,
        typer.Option("--alignment", help="plan the re-export with this alignment.json"),
    ] = None,
) -> None:
    """Print units per stage, planned memory per unit, and the job script a cluster would run."""
    from emflow import cluster as clusters
    from emflow.discover import discover_recipe
    from emflow.plan import plan_preview
    from emflow.preflight import check_environment
    from emflow.recipe import load_recipe

    r = load_recipe(recipe)
    check_environment(r)  # listing a bucket with curl's verbose output would print credentials
    cat = discover_recipe(r)

    req = cluster_request(
        r, cluster, cluster_config, workers, max_workers, threads, memory, insecure
    )
    p, note = plan_preview(
        r, len(cat.slices), cat.shape_yx, cat.dtype, alignment_path=alignment, refs=cat.slices
    )
    typer.echo(cat.summary())
    typer.echo(f"plan: {note}")
    typer.echo(p.summary())
    n = len(cat.slices)
    stages = []
    if cat.dtype == "uint16" and r.depth.output == "uint8" and r.depth.window is None:
        stages.append(("stats", 1))
    if r.align.enabled and alignment is None:
        stages += [
            ("features", n),
            ("match", max(0, n - 1)),
            ("match2", max(0, n - 2)),  # plus bridges over pairs that fail
            ("solve", 1),
            ("qc", max(0, 2 * n - 3)),
        ]
    stages += [(s, k) for s, k, _ in p.stages()]
    typer.echo("units per stage: " + ", ".join(f"{s} {k}" for s, k in stages))
    typer.echo(f"planned memory per unit: up to {p.memory_per_unit / 2**30:.2f} GiB")
    threads = clusters.threads_per_worker(req)
    if threads:
        need, have = p.worker_memory(threads), clusters.memory_per_worker(req)
        fits = ""
        if have:
            fits = f"; workers have {have / 2**30:.2f} GiB: " + (
                "fits" if need <= have else "DOES NOT FIT: set run.memory_per_worker"
            )
        typer.echo(
            f"planned memory per worker ({threads} thread(s)): up to {need / 2**30:.2f} GiB{fits}"
        )
    typer.echo(f"cluster: {json.dumps(clusters.describe(req), default=str)}")
    script = clusters.job_script(req)
    if script:
        typer.echo("# job script that would be submitted (nothing was submitted):")
        typer.echo(script)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
