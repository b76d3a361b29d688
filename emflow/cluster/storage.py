"""Give every worker of a run the recipe's object-store settings (never a credential).

A recipe's ``storage:`` section names endpoint, region, profile, anonymous access and
per-bucket overrides by reference only. The driver registers :class:`StorageSettingsPlugin`
with them; each worker, also one that joins later (an adaptive SLURM job, a new Kubernetes
pod), resolves them against its *own* environment (its keys, its profile files) before its
first unit, so no key travels through the scheduler, the task graph or the spec.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "emflow-storage"


class StorageSettingsPlugin(WorkerPlugin):
    """Applies a recipe's ``storage`` section (as JSON: no secrets in it) on each worker."""

    name = PLUGIN_NAME

    def __init__(self, section: dict[str, Any]) -> None:
        self.section = section

    def setup(self, worker: Any) -> None:
        apply(self.section)


def apply(section: dict[str, Any]) -> None:
    """Use the ``storage`` section ``section`` in this process (completed from its environment)."""
    from emflow.io import storage
    from emflow.recipe import Storage

    storage.configure(Storage.model_validate(section).settings())


def share_settings(client: Any, section: Any) -> None:
    """Register the recipe's ``storage`` section (a :class:`~emflow.recipe.Storage`) with every
    present and future worker of ``client``."""
    data = section.model_dump(mode="json")
    client.register_plugin(StorageSettingsPlugin(data), name=PLUGIN_NAME)
