"""Batch-scheduler clusters (SLURM, LSF, PBS, SGE) through dask-jobqueue.

A request plus its config resolve to the keyword arguments of the dask-jobqueue
cluster class (:func:`_jobqueue_kwargs`); :func:`job_script` renders the batch
script a worker job would run without submitting anything, and
:func:`_jobqueue_client` starts the cluster with temporary TLS certificates,
scales it with ``adapt`` and cancels every job it submitted on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emflow.cluster import secrets
from emflow.cluster.config import (
    _EMFLOW_KEYS,
    _JOBQUEUE_CLASS,
    JOBQUEUE_KINDS,
    ClusterRequest,
    _adapt_bounds,
    _check_kind,
    lifetime_args,
    load_config,
    walltime_seconds,
)
from emflow.cluster.local import client_on
from emflow.errors import ClusterError

logger = logging.getLogger(__name__)


def _jobqueue_kwargs(request: ClusterRequest, config: dict[str, Any]) -> dict[str, Any]:
    kind = request.kind
    kw = {k: v for k, v in config.items() if k not in _EMFLOW_KEYS and v is not None}
    processes = int(kw.get("processes") or 1)  # worker processes per job
    if request.threads_per_worker is not None:
        kw["cores"] = request.threads_per_worker * processes
    if request.memory_per_worker is not None:
        if processes == 1:
            kw["memory"] = request.memory_per_worker
        else:
            kw["memory"] = f"{_parse_bytes(request.memory_per_worker) * processes}B"
    if request.log_dir is not None and "log_directory" not in kw:
        kw["log_directory"] = str(request.log_dir)
    extra = list(kw.get("worker_extra_args") or [])
    if "walltime" in kw and not any(str(a).startswith("--lifetime") for a in extra):
        extra += lifetime_args(walltime_seconds(kw["walltime"], kind))
    kw["worker_extra_args"] = extra
    from emflow.memory import WORKER_ENV, WORKER_MALLOC

    prologue = list(kw.get("job_script_prologue") or [])
    # malloc arenas and thresholds (emflow.memory). The job's environment reaches the worker
    # process: the nanny lets a variable set in its own environment win over Dask's
    # pre-spawn-environ default (MALLOC_TRIM_THRESHOLD_=65536)
    from emflow.cluster import quiet

    # and Dask's rarer tick and profile samples (emflow.cluster.quiet), unless the site set them
    dask_env = quiet.env_vars(quiet.settings())
    for name, value in {**WORKER_ENV, **WORKER_MALLOC, **dask_env}.items():
        if not any(f"{name}=" in str(line) for line in prologue):
            prologue.append(f"export {name}={value}")
    kw["job_script_prologue"] = prologue
    sched = dict(kw.get("scheduler_options") or {})
    sched.setdefault("dashboard_address", request.dashboard_address)
    kw["scheduler_options"] = sched
    if not request.insecure and "shared_temp_directory" not in kw:
        shared = request.secrets_dir or request.log_dir or kw.get("log_directory") or Path.cwd()
        kw["shared_temp_directory"] = str(shared)
    return kw


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"--memory-per-worker {text!r} is not a size; use e.g. 4GiB") from exc


# ---------------------------------------------------------------------------
# job scripts
# ---------------------------------------------------------------------------


#: Scheduler address shown in :func:`job_script` (the real one is known at start).
SCHEDULER_PLACEHOLDER = "{protocol}://<scheduler-host>:<port>"


def job_script(request: ClusterRequest) -> str | None:
    """The batch script a worker job would run, without submitting anything.

    It is the script dask-jobqueue submits, built with the same job class and
    keyword arguments, except for two placeholders only known once the
    scheduler runs: its address (``tls://<scheduler-host>:<port>``) and the
    random suffix of the temporary certificate files (``XXXXXXXX``).

    Returns
    -------
    str or None
        The script for slurm/lsf/pbs/sge; ``None`` for local, kubernetes and
        scheduler addresses (see :func:`kubernetes_spec`).
    """
    _check_kind(request)
    if request.kind not in JOBQUEUE_KINDS:
        return None
    config, _ = load_config(request)
    kw = _jobqueue_kwargs(request, config)
    import dask_jobqueue
    from distributed.security import Security

    job_cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS[request.kind]).job_cls
    security = None
    protocol = None
    if not request.insecure:
        protocol = "tls://"
        shared = kw["shared_temp_directory"]

        def tmp(key: str) -> str:
            return f"{shared}/.dask-jobqueue.worker.{key}.XXXXXXXX"

        security = Security(
            tls_ca_file=tmp("ca_file"),
            tls_worker_cert=tmp("cert"),
            tls_worker_key=tmp("key"),
            require_encryption=True,
        )
    job_kw = _job_only_kwargs(kw)
    address = SCHEDULER_PLACEHOLDER.format(protocol="tcp" if request.insecure else "tls")
    try:
        job = job_cls(
            address,
            name="dummy-name",
            config_name=request.kind,
            protocol=protocol,
            security=security,
            **job_kw,
        )
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"--cluster {request.kind}: {exc}".splitlines()[0]) from exc
    return job.job_script()


_CLUSTER_ONLY = {
    "n_workers",
    "loop",
    "security",
    "shared_temp_directory",
    "silence_logs",
    "name",
    "asynchronous",
    "dashboard_address",
    "host",
    "scheduler_options",
    "scheduler_cls",
    "protocol",
    "config_name",
}


def _job_only_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k not in _CLUSTER_ONLY}


def _tracking_job_cls(
    base: type, seen: list[str], on_submit: Callable[[str], object] | None = None
) -> type:
    """A subclass of a dask-jobqueue job class that records submitted job ids."""

    async def start(self: Any) -> None:
        await base.start(self)
        if self.job_id:
            seen.append(str(self.job_id))
            if on_submit is not None:
                on_submit(str(self.job_id))

    return type(f"Emflow{base.__name__}", (base,), {"start": start})


@contextmanager
def _jobqueue_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    import dask_jobqueue

    cluster_cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS[request.kind])
    kw = _jobqueue_kwargs(request, config)
    if not request.insecure:
        kw["security"] = True  # Security.temporary(); worker files in shared_temp_directory
    submitted: list[str] = []
    cancel = cluster_cls.job_cls.cancel_command
    folder = request.secrets_dir
    note = None
    if folder is not None:  # a driver that dies leaves its jobs to the next one to cancel
        note = lambda job_id: secrets.note_job(folder, job_id, cancel)  # noqa: E731
    kw["job_cls"] = _tracking_job_cls(cluster_cls.job_cls, submitted, note)
    for key in ("log_directory", "shared_temp_directory"):
        if kw.get(key):
            directory = Path(os.path.expanduser(os.path.expandvars(str(kw[key]))))
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ClusterError(
                    f"cluster config {key} {directory}: cannot create ({exc.strerror}); "
                    "choose a directory on a file system the compute nodes share"
                ) from exc
    if request.secrets_dir is not None:
        secrets.prepare(request.secrets_dir)  # 0700; a dead driver's certificates and jobs go
    import dask

    from emflow.cluster import quiet

    try:
        with dask.config.set(quiet.settings()):  # the scheduler, in this process
            cluster = cluster_cls(**kw)
    except (TypeError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0]
        raise ClusterError(f"--cluster {request.kind}: cannot start ({msg})") from exc
    if not request.insecure and request.secrets_dir is not None:
        _register_worker_certificates(cluster, request.secrets_dir)
    low, high = _adapt_bounds(request, config) or (1, 1)
    per_job = int(kw.get("processes") or 1)  # adapt counts jobs; bounds count workers
    min_jobs, max_jobs = -(-low // per_job), -(-high // per_job)

    def after_close() -> None:
        try:
            _reap_jobs(cancel, submitted)
        finally:
            for key in ("ca_file", "cert", "key"):  # dask-jobqueue's temporary files: delete
                handle = getattr(cluster, f"_job_{key}", None)
                if handle is not None:
                    with contextlib.suppress(OSError):
                        handle.close()
            if request.secrets_dir is not None:
                secrets.release(request.secrets_dir)

    with client_on(
        cluster,
        setup=lambda: cluster.adapt(minimum_jobs=min_jobs, maximum_jobs=max_jobs),
        after_close=after_close,
    ) as client:
        yield client


def _register_worker_certificates(cluster: Any, folder: Path) -> None:
    """Note the worker certificate files dask-jobqueue wrote outside ``folder`` (a site's own
    ``shared_temp_directory``) so the next driver removes them if this one dies."""
    files = [
        getattr(getattr(cluster, f"_job_{key}", None), "name", None)
        for key in ("ca_file", "cert", "key")
    ]
    outside = [f for f in files if f and Path(f).resolve().parent != Path(folder).resolve()]
    if outside:
        secrets.register(folder, outside)


def _reap_jobs(cancel_command: str, job_ids: list[str]) -> None:
    """Cancel every job id this run submitted (already-finished ids are harmless)."""
    if not job_ids:
        return
    cmd = [*shlex.split(cancel_command), *sorted(set(job_ids))]
    try:
        subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - best effort
        logger.warning("could not cancel worker jobs %s: %s", job_ids, exc)
