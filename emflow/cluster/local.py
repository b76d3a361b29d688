"""Clients on this machine or on an existing scheduler: ``LocalCluster`` and addresses.

``local`` starts a :class:`distributed.LocalCluster` (no TLS); ``tcp://host:port``
/ ``tls://host:port`` connects to a running scheduler, with certificates from the
config's ``security`` mapping or the dask config. :func:`_connect` (also used by
the Kubernetes client) turns a failed connection into a :class:`ClusterError`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from emflow.cluster.config import _EMFLOW_KEYS, ClusterRequest, _adapt_bounds
from emflow.errors import ClusterError

#: threads per worker process when neither the config nor the command line says: units spend
#: their time in code that releases the GIL (OpenCV decode, numpy, tensorstore), so a few
#: processes with several threads each start faster and share one tensorstore cache
LOCAL_THREADS_PER_WORKER = 4


def default_local_shape(cores: int) -> tuple[int, int]:
    """(workers, threads per worker) of the default local cluster on ``cores`` cores."""
    threads = max(1, min(LOCAL_THREADS_PER_WORKER, cores))
    return max(1, cores // threads), threads


def _local_kwargs(request: ClusterRequest, config: dict[str, Any]) -> dict[str, Any]:
    kw = {k: v for k, v in config.items() if k not in _EMFLOW_KEYS}
    if request.workers is not None:
        kw["n_workers"] = request.workers
    if request.threads_per_worker is not None:
        kw["threads_per_worker"] = request.threads_per_worker
    if kw.get("n_workers") is None and kw.get("threads_per_worker") is None:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        kw["n_workers"], kw["threads_per_worker"] = default_local_shape(cores or 1)
    if request.memory_per_worker is not None:
        kw["memory_limit"] = request.memory_per_worker
    kw.setdefault("dashboard_address", request.dashboard_address)
    return kw


@contextmanager
def _address_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    from distributed.security import Security

    security = None
    if config.get("security"):
        try:
            security = Security(**config["security"])
        except TypeError as exc:
            raise ClusterError(
                f"cluster config: 'security' has a bad key ({exc}); use Security keywords "
                "such as tls_ca_file, tls_client_cert, tls_client_key"
            ) from exc
    elif request.kind.startswith("tls://"):
        security = Security()  # from dask config (distributed.comm.tls.*)
        if not security.tls_ca_file:
            raise ClusterError(
                f"--cluster {request.kind}: a tls:// scheduler needs certificates; set 'security' "
                "(tls_ca_file, tls_client_cert, tls_client_key) in --cluster-config"
            )
    client = _connect(
        request.kind,
        security,
        config.get("timeout", "30s"),
        f"--cluster {request.kind}: cannot reach the scheduler ({{exc}}); check the address "
        "and the certificates",
    )
    try:
        yield client
    finally:
        client.close()


def _connect(address: str, security: Any, timeout: str, message: str) -> Any:
    """``Client(address)``, or :class:`ClusterError` with ``message`` (``{exc}`` filled in).

    A Client whose connection failed closes itself in ``__del__``; if the garbage
    collector runs that while a later Client starts its event loop, both wait on
    the same lock forever (seen with distributed 2026.8). So the failed Client is
    collected here, before the error leaves.
    """
    import gc

    from distributed import Client

    failure = None
    try:
        return Client(address, security=security, timeout=timeout)
    except (OSError, TimeoutError, TypeError, ValueError) as exc:
        failure = message.format(exc=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    gc.collect()
    raise ClusterError(failure)


@contextmanager
def client_on(
    cluster: Any,
    *,
    setup: Callable[[], object] | None = None,
    after_close: Callable[[], object] | None = None,
) -> Iterator[Any]:
    """Yield a Client of a started cluster, closing the client and then the cluster on exit.

    ``setup`` (e.g. ``cluster.adapt``) runs first; the cluster is closed even if it fails.
    ``after_close`` runs last in every case (e.g. cancel batch jobs the cluster left behind).
    """
    from distributed import Client

    try:
        if setup is not None:
            setup()
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        try:
            cluster.close()
        finally:
            if after_close is not None:
                after_close()


def worker_env() -> dict[str, str]:
    """The environment local workers start with: Dask's pre-spawn variables and emflow's malloc
    arenas and thresholds."""
    import dask

    from emflow.memory import WORKER_ENV, WORKER_MALLOC

    if "distributed" in sys.modules:
        dask_env = dask.config.get("distributed.nanny.pre-spawn-environ") or {}
    else:  # Dask's defaults are in its config once distributed is imported: read them here
        dask_env = {
            **_distributed_default("nanny", "pre-spawn-environ"),
            **(dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}),
        }
    env = {**WORKER_ENV, **dask_env}
    env.update(WORKER_MALLOC)  # after Dask's MALLOC_TRIM_THRESHOLD_ (see emflow.memory)
    return {k: str(v) for k, v in env.items()}


def default_worker_env() -> dict[str, str]:
    """:func:`worker_env` as Dask's and emflow's defaults make it, read without importing Dask
    (~75 ms): what :mod:`emflow.cluster.forkserver` starts its server with, first thing. A
    user's Dask config may change it (``distributed.nanny.pre-spawn-environ``); a server
    started with another environment than :func:`worker_env` is not used
    (:func:`worker_environment`)."""
    from emflow.memory import WORKER_ENV, WORKER_MALLOC

    env = {**WORKER_ENV, **_distributed_default("nanny", "pre-spawn-environ")}
    env.update(WORKER_MALLOC)
    return {k: str(v) for k, v in env.items()}


def _distributed_default(*keys: str) -> dict[str, Any]:
    """A mapping of distributed's own defaults (its distributed.yaml), without importing it."""
    import importlib.util
    from pathlib import Path

    import yaml

    spec = importlib.util.find_spec("distributed")
    if spec is None or spec.origin is None:
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(Path(spec.origin).parent / "distributed.yaml") as f:
        node = (yaml.load(f, Loader=loader) or {}).get("distributed", {})
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return dict(node) if isinstance(node, dict) else {}


@contextmanager
def worker_environment() -> Iterator[None]:
    """Nannies created inside start their workers with emflow's environment (malloc arenas and
    thresholds), forked from :mod:`emflow.cluster.forkserver`'s server if it runs."""
    import dask

    from emflow.cluster import forkserver

    from emflow.cluster import quiet

    env = worker_env()
    # the scheduler and nannies made inside read them; the nannies hand them to their workers
    settings: dict[str, Any] = {"distributed.nanny.pre-spawn-environ": env, **quiet.settings()}
    if forkserver.running() and forkserver.environment() != env:
        forkserver.stop()  # started with Dask's defaults, which the user's config changed
    if forkserver.running():
        import distributed.utils

        settings["distributed.worker.multiprocessing-method"] = "forkserver"
        # the server runs with its preload: without this flag (distributed 2026.8) Dask would
        # import every optional package here to choose a preload that can no longer apply
        distributed.utils._forkserver_preload_set = True
    with dask.config.set(settings):
        yield


def _dashboard_on_visit(kw: dict[str, Any]) -> Callable[[Any], object] | None:
    """Start the scheduler without its Bokeh dashboard and return what serves it on its first
    visit once the cluster runs (:mod:`emflow.cluster.lazy_dashboard`: a run nobody watches
    never imports Bokeh, ~0.6 CPU-s of the driver's start). Nothing changes when the config
    sets the scheduler's or the services' keywords itself, or has no dashboard.
    """
    if kw.get("dashboard_address") is None or "scheduler_kwargs" in kw or "service_kwargs" in kw:
        return None
    kw["scheduler_kwargs"] = {"dashboard": False}
    from emflow.cluster.lazy_dashboard import serve_on_visit

    return serve_on_visit


@contextmanager
def _local_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    from distributed import LocalCluster

    kw = _local_kwargs(request, config)
    dashboard = _dashboard_on_visit(kw)
    try:
        with worker_environment():
            cluster = LocalCluster(**kw)
    except TypeError as exc:
        raise ClusterError(f"local cluster config: {exc}; check the keys") from exc
    if dashboard is not None:
        try:
            dashboard(cluster)
        except BaseException:
            cluster.close()
            raise
    bounds = _adapt_bounds(request, config)
    wants = request.max_workers is not None or (config.get("adapt") or {}).get("maximum")
    adapt = None
    if wants and bounds is not None:
        adapt = lambda: cluster.adapt(minimum=bounds[0], maximum=bounds[1])  # noqa: E731
    from emflow.cluster import forkserver

    with client_on(cluster, setup=adapt, after_close=forkserver.stop) as client:
        yield client
