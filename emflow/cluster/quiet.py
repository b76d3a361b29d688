"""Dask's periodic work in an idle event loop, made rarer where the user's config left it alone.

Every Dask server (scheduler, nanny, worker) runs a 20 ms "tick" that only measures how late
its event loop is (``distributed.admin.tick.interval``), and every worker samples its own
stack every 10 ms for the dashboard's Profile page (``distributed.worker.profile.interval``).
An idle 2-worker local cluster spent 0.027-0.030 CPU-s per second in each worker and 0.036 in
the driver on them; with a 100 ms profile sample and a 1 s tick 0.009-0.012 per worker and
0.018 in the driver (the Profile page keeps its 1 s cycle, with fewer samples). emflow sets
both for the clusters it starts (local: the scheduler, nannies and workers; batch jobs and
Kubernetes pods: the workers' environment, and the scheduler pod's), only where the user's
Dask config still has distributed's own default: a value a user set wins, even one equal to
the default is then not distinguishable from it and is replaced.
"""

from __future__ import annotations

#: Dask config key -> emflow's value (Dask's defaults: 10ms, 20ms)
SETTINGS = {
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "1s",
}


def settings() -> dict[str, str]:
    """The :data:`SETTINGS` whose key this process's Dask config leaves at distributed's
    default (distributed.yaml)."""
    import dask
    import distributed  # noqa: F401  (its defaults in dask.config)

    from emflow.cluster.local import _distributed_default

    out = {}
    for key, value in SETTINGS.items():
        *parent, leaf = key.split(".")[1:]
        default = _distributed_default(*parent).get(leaf)
        if default is not None and dask.config.get(key, None) == default:
            out[key] = value
    return out


def env_vars(chosen: dict[str, str]) -> dict[str, str]:
    """``chosen`` as the environment variables Dask reads (``DASK_DISTRIBUTED__ADMIN__...``)."""
    return {
        "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split(".")): value
        for key, value in chosen.items()
    }
