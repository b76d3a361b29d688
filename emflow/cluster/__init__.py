"""Turn ``--cluster NAME`` plus a site YAML into a Dask ``Client``.

One request (:class:`ClusterRequest`) describes where a run executes:

* ``local`` — a :class:`distributed.LocalCluster` on this machine (no TLS);
* ``slurm``, ``lsf``, ``pbs``, ``sge`` — a dask-jobqueue cluster whose workers
  are batch jobs; scaled with ``adapt`` (minimum/maximum jobs), each worker
  retires itself (``--lifetime``) before the job's walltime, job logs go to a
  log directory, and scheduler, workers and client talk TLS with temporary
  certificates written to a shared directory;
* ``kubernetes`` — a ``DaskCluster`` resource of the dask-kubernetes operator,
  built with ``make_cluster_spec`` and customised (volumes, env, resources,
  scheduler preload :mod:`emflow.dask_preload`, TLS secret);
* ``tcp://host:port`` / ``tls://host:port`` — an existing scheduler.

Configuration is a flat YAML mapping whose keys are the keyword arguments of
the cluster class (``LocalCluster``, ``SLURMCluster``, ... or
``make_cluster_spec``), passed through unchanged. emflow reserves a few keys of
its own, documented in the shipped ``cluster_configs/<kind>.yaml``:
``adapt: {minimum, maximum}`` (workers; one worker per job) for every kind,
and ``pod`` / ``namespace`` / ``tls_secret`` for kubernetes. The built-in
:data:`DEFAULTS` equal the shipped YAML files (a test keeps them in step) so
an installed emflow without the repository behaves the same.

The package keeps one concept per module: :mod:`emflow.cluster.config`
(requests, defaults, site YAML, validation, walltime helpers),
:mod:`emflow.cluster.local` (local and address clients),
:mod:`emflow.cluster.jobqueue` (batch schedulers, job scripts, job reaping) and
:mod:`emflow.cluster.kubernetes` (DaskCluster spec, TLS secret, client). This
module dispatches (:func:`open_client`, :func:`describe`) and re-exports their
names, so ``emflow.cluster.<name>`` works as before the split.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Every name of the former single module stays importable as emflow.cluster.<name>;
# ``X as X`` marks an explicit re-export of names outside __all__ (tests use some).
from emflow.cluster.config import _ADDRESS_RE as _ADDRESS_RE
from emflow.cluster.config import _EMFLOW_KEYS as _EMFLOW_KEYS
from emflow.cluster.config import _JOBQUEUE_CLASS as _JOBQUEUE_CLASS
from emflow.cluster.config import _JOBQUEUE_COMMON as _JOBQUEUE_COMMON
from emflow.cluster.config import _K8S_EMFLOW_KEYS as _K8S_EMFLOW_KEYS
from emflow.cluster.config import _K8S_POD_KEYS as _K8S_POD_KEYS
from emflow.cluster.config import _K8S_RESOURCE_KEYS as _K8S_RESOURCE_KEYS
from emflow.cluster.config import CLUSTER_KINDS, DEFAULTS, ClusterRequest, load_config
from emflow.cluster.config import JOBQUEUE_KINDS as JOBQUEUE_KINDS
from emflow.cluster.config import _adapt_bounds as _adapt_bounds
from emflow.cluster.config import _allowed_keys as _allowed_keys
from emflow.cluster.config import _check_kind as _check_kind
from emflow.cluster.config import _is_address as _is_address
from emflow.cluster.config import _read_yaml as _read_yaml
from emflow.cluster.config import _validate_keys as _validate_keys
from emflow.cluster.config import _walltime_msg as _walltime_msg
from emflow.cluster.config import lifetime_args as lifetime_args
from emflow.cluster.config import shipped_config_path as shipped_config_path
from emflow.cluster.config import walltime_seconds as walltime_seconds
from emflow.cluster.jobqueue import _CLUSTER_ONLY as _CLUSTER_ONLY
from emflow.cluster.jobqueue import SCHEDULER_PLACEHOLDER as SCHEDULER_PLACEHOLDER
from emflow.cluster.jobqueue import _job_only_kwargs as _job_only_kwargs
from emflow.cluster.jobqueue import _jobqueue_client as _jobqueue_client
from emflow.cluster.jobqueue import _jobqueue_kwargs as _jobqueue_kwargs
from emflow.cluster.jobqueue import _parse_bytes as _parse_bytes
from emflow.cluster.jobqueue import _reap_jobs as _reap_jobs
from emflow.cluster.jobqueue import _tracking_job_cls as _tracking_job_cls
from emflow.cluster.jobqueue import job_script
from emflow.cluster.kubernetes import K8S_TLS_DIR as K8S_TLS_DIR
from emflow.cluster.kubernetes import (
    PRELOAD_MODULE,
    kubernetes_autoscaler,
    kubernetes_spec,
    kubernetes_tls_secret,
)
from emflow.cluster.kubernetes import _kubecluster_client as _kubecluster_client
from emflow.cluster.kubernetes import _kubernetes_client as _kubernetes_client
from emflow.cluster.kubernetes import _wait_for_service as _wait_for_service
from emflow.cluster.local import _address_client as _address_client
from emflow.cluster.local import _connect as _connect
from emflow.cluster.local import _local_client as _local_client
from emflow.cluster.local import _local_kwargs as _local_kwargs
from emflow.errors import ClusterError as ClusterError

__all__ = [
    "CLUSTER_KINDS",
    "DEFAULTS",
    "PRELOAD_MODULE",
    "ClusterRequest",
    "describe",
    "job_script",
    "kubernetes_autoscaler",
    "kubernetes_spec",
    "kubernetes_tls_secret",
    "load_config",
    "memory_per_worker",
    "open_client",
    "threads_per_worker",
]

logger = logging.getLogger(__name__)


def describe(request: ClusterRequest) -> dict[str, Any]:
    """Resolved cluster settings, for ``emflow plan`` to print.

    Nothing is started or submitted.

    Returns
    -------
    dict
        ``kind``, ``config`` (source of the values), ``cluster_class``,
        ``kwargs`` (exactly what the class will receive, security aside),
        ``adapt`` (``{"minimum", "maximum"}`` workers or ``None``) and
        ``security`` (a one-line description).
    """
    config, source = load_config(request)
    out: dict[str, Any] = {"kind": request.kind, "config": source}
    if _is_address(request.kind):
        tls = request.kind.startswith("tls://")
        out.update(
            cluster_class=None,
            kwargs={
                "address": request.kind,
                **{k: v for k, v in config.items() if k != "security"},
            },
            adapt=None,
            security="TLS with certificates from the config's 'security'" if tls else "none (tcp)",
        )
        return out
    bounds = _adapt_bounds(request, config)
    if request.kind in JOBQUEUE_KINDS:
        bounds = bounds or (1, 1)
    elif request.max_workers is None and (config.get("adapt") or {}).get("maximum") is None:
        bounds = None  # fixed size: local n_workers / kubernetes replicas
    out["adapt"] = None if bounds is None else {"minimum": bounds[0], "maximum": bounds[1]}
    if request.kind == "local":
        out.update(
            cluster_class="distributed.LocalCluster",
            kwargs=_local_kwargs(request, config),
            security="none (local cluster)",
        )
    elif request.kind in JOBQUEUE_KINDS:
        out.update(
            cluster_class=f"dask_jobqueue.{_JOBQUEUE_CLASS[request.kind]}",
            kwargs=_jobqueue_kwargs(request, config),
            security=_security_text(request),
        )
    else:
        spec = kubernetes_spec(request)
        out.update(
            cluster_class="dask_kubernetes.operator (DaskCluster resource)",
            kwargs={
                "custom_cluster_spec": spec,
                "namespace": config.get("namespace"),
                "autoscaler": kubernetes_autoscaler(request),
            },
            security=_security_text(request),
        )
    return out


def threads_per_worker(request: ClusterRequest) -> int | None:
    """Threads each worker of this request will run (units at once), if known before start."""
    kw = describe(request).get("kwargs") or {}
    if request.kind == "local":
        return kw.get("threads_per_worker")
    if request.kind in JOBQUEUE_KINDS:
        processes = int(kw.get("processes") or 1)
        return max(1, int(kw.get("cores") or 1) // processes)
    return request.threads_per_worker


def memory_per_worker(request: ClusterRequest) -> int | None:
    """Bytes of memory each worker of this request will have, if known before start."""
    from dask.utils import parse_bytes

    kw = describe(request).get("kwargs") or {}
    try:
        if request.kind == "local":
            limit = kw.get("memory_limit", "auto")
            if limit in (None, 0, "0"):
                return None
            if limit == "auto":
                import psutil

                return int(psutil.virtual_memory().total / max(1, int(kw.get("n_workers") or 1)))
            return int(parse_bytes(limit)) if isinstance(limit, str) else int(limit)
        if request.kind in JOBQUEUE_KINDS and kw.get("memory"):
            return int(parse_bytes(str(kw["memory"]))) // max(1, int(kw.get("processes") or 1))
    except (ValueError, TypeError):
        return None
    return None


def _security_text(request: ClusterRequest) -> str:
    if request.insecure:
        return "none (--insecure): scheduler port open to anyone who can reach it"
    if request.kind == "kubernetes":
        return "TLS, temporary certificates in a Kubernetes secret"
    return "TLS, temporary certificates (shared_temp_directory) for scheduler, workers, client"


def _warn_insecure(request: ClusterRequest) -> None:
    if request.insecure and request.kind != "local":
        warnings.warn(
            f"--insecure: the {request.kind} scheduler accepts unencrypted, "
            "unauthenticated connections from anyone who can reach its port",
            UserWarning,
            stacklevel=3,
        )


@contextmanager
def open_client(request: ClusterRequest) -> Iterator[Any]:
    """Start (or connect to) the cluster of ``request`` and yield a ``Client``.

    On exit the client and the cluster are closed; for batch schedulers every
    job this cluster submitted is cancelled, including jobs the adaptive
    scaler already forgot, so no job outlives the run.

    Raises
    ------
    ClusterError
        Unknown kind, bad config file or key, or the cluster cannot start.
    """
    _check_kind(request)
    config, _source = load_config(request)
    _warn_insecure(request)
    if _is_address(request.kind):
        with _address_client(request, config) as client:
            yield client
    elif request.kind == "local":
        with _local_client(request, config) as client:
            yield client
    elif request.kind in JOBQUEUE_KINDS:
        with _jobqueue_client(request, config) as client:
            yield client
    else:
        with _kubernetes_client(request, config) as client:
            yield client
