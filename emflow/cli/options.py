"""CLI options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
ClusterOpt = Annotated[
    str,
    typer.Option(
        "--cluster", help="local | slurm | lsf | pbs | sge | kubernetes | tcp://host:port"
    ),
]
ClusterConfigOpt = Annotated[
    Path | None,
    typer.Option("--cluster-config", help="site YAML with dask-jobqueue / dask-kubernetes keys"),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="workers (adaptive minimum on HPC)")
]
MaxWorkersOpt = Annotated[
    int | None, typer.Option("--max-workers", min=1, help="adaptive maximum on HPC")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads-per-worker", "--threads", min=1, help="threads per worker")
]


def _memory(value: str | None) -> str | None:
    """Refuse a memory string Dask cannot read, as a usage error naming the option."""
    if value is None:
        return value
    from emflow.recipe import parse_memory

    try:
        parse_memory(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-per-worker", "--memory", help="memory per worker, e.g. 4GiB", callback=_memory
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="no TLS between scheduler and workers")
]


def cluster_request(
    recipe,
    cluster: str,
    cluster_config: Path | None,
    workers: int | None,
    max_workers: int | None,
    threads: int | None,
    memory: str | None,
    insecure: bool,
    log_dir: Path | None = None,
    dashboard_address: str = ":8787",
    secrets_dir: Path | None = None,
):
    """Merge recipe ``run`` settings and CLI flags (flags win) into a ClusterRequest.

    Worker logs go to ``log_dir``, by default the run folder's ``worker-logs/``.
    """
    from emflow.cluster import ClusterRequest

    return ClusterRequest(
        kind=cluster,
        config_path=cluster_config,
        workers=workers or recipe.run.workers,
        max_workers=max_workers,
        threads_per_worker=threads or recipe.run.threads_per_worker,
        memory_per_worker=memory or recipe.run.memory_per_worker,
        insecure=insecure,
        log_dir=log_dir if log_dir is not None else recipe.run_folder / "worker-logs",
        dashboard_address=dashboard_address,
        secrets_dir=secrets_dir,
    )
