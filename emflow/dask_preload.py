"""Scheduler preload: ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=emflow.dask_preload``.

Installs the lattice plugin (and with it the ``/emflow`` dashboard page, the
``/emflow/lattice.json`` route and the ``emflow_*`` RPC handlers) in a
scheduler emflow did not start, e.g. the scheduler pod of a Kubernetes
``DaskCluster``. ``emflow run`` on such a cluster then finds the plugin there
(registration is idempotent) instead of registering its own.
"""

from __future__ import annotations

from typing import Any

from emflow.lattice import PLUGIN_NAME, LatticePlugin


def dask_setup(scheduler: Any) -> None:
    """Add :class:`~emflow.lattice.LatticePlugin`; the scheduler starts it with its plugins."""
    if PLUGIN_NAME not in scheduler.plugins:
        scheduler.add_plugin(LatticePlugin(), name=PLUGIN_NAME, idempotent=True)
