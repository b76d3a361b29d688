"""``emflow run``: run a recipe on a local or HPC/Kubernetes Dask cluster (or serially)."""

from __future__ import annotations

import logging
import time
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


def _logger(run_dir: Path) -> logging.Logger:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("emflow.run")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    log.propagate = False
    return log


def _wait_for_a_worker(client, cluster: str, log_dir: Path, say) -> None:
    """Block until one worker has joined (HPC jobs may queue), so the plan sees real resources."""
    from emflow.errors import ClusterError

    if client.scheduler_info().get("workers"):
        return
    timeout = 60 if cluster == "local" else 3600
    say(f"waiting for a worker to connect (up to {timeout} s) ...")
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"--cluster {cluster}: no worker connected within {timeout} s; check the job queue "
            f"(e.g. squeue) and the worker logs in {log_dir}"
        ) from None


def run(
    recipe: RecipeArg,
    cluster: ClusterOpt = "local",
    cluster_config: ClusterConfigOpt = None,
    workers: WorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    threads: ThreadsOpt = None,
    memory: MemoryOpt = None,
    insecure: InsecureOpt = False,
    serial: Annotated[
        bool, typer.Option("--serial", help="no Dask: run every unit here, in order")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="discard earlier output of this recipe")
    ] = False,
    dashboard: Annotated[
        str, typer.Option("--dashboard", help="local dashboard address")
    ] = ":8787",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    alignment: Annotated[
        Path | None,
        typer.Option("--alignment", help="re-export with this alignment.json (no matching)"),
    ] = None,
) -> None:
    """Run a recipe: discover → align → render slabs → write pyramids. Resumes an interrupted run."""
    from emflow.pipeline import RUN_FOLDER
    from emflow.pipeline import run as run_pipeline
    from emflow.recipe import load_recipe

    r = load_recipe(recipe)
    run_dir = r.output_path / RUN_FOLDER
    try:
        log = _logger(run_dir)
    except OSError as exc:
        from emflow.errors import OutputError

        raise OutputError(
            f"output_dir {r.output_path} is not writable ({exc.strerror or exc})"
        ) from None

    def say(msg: str) -> None:
        log.info(msg)
        if not quiet:
            typer.echo(msg, err=True)

    say(f"emflow run {recipe} → {r.output_path}")
    t0 = time.perf_counter()
    progress = None if not quiet else False
    if serial:
        result = run_pipeline(
            r, client=None, restart=restart, progress=progress, log=say, alignment_path=alignment
        )
    else:
        from emflow import cluster as clusters

        req = cluster_request(
            r,
            cluster,
            cluster_config,
            workers,
            max_workers,
            threads,
            memory,
            insecure,
            run_dir / "worker-logs",
            dashboard,
            run_dir / "secrets",
        )
        with clusters.open_client(req) as client:
            say(f"dashboard: {client.dashboard_link}")
            try:
                from emflow.dashboard import dashboard_url

                say(f"lattice:   {dashboard_url(client)}")
            except Exception:  # dashboard page is optional (no bokeh route on a foreign scheduler)
                pass
            _wait_for_a_worker(client, cluster, run_dir / "worker-logs", say)
            result = run_pipeline(
                r,
                client=client,
                restart=restart,
                progress=progress,
                log=say,
                alignment_path=alignment,
            )
    secs = time.perf_counter() - t0
    say(
        f"done in {secs:.1f} s: {result.bytes_in / 1e6:.0f} MB of slices at {result.bytes_in / 1e6 / secs:.1f} MB/s"
    )
    for name, path in result.output_paths.items():
        say(f"  {name}: {path}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
