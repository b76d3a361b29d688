"""The Dask scheduler side of the lattice: :class:`LatticePlugin`, :func:`ensure_plugin`, task keys.

:func:`parse_key` maps task keys ``("emflow-<stage>-<run_id>", index)`` to
``(run_id, stage, index)``; the plugin feeds a :class:`~emflow.lattice.state.Lattice`
from scheduler transitions and serves the ``emflow_*`` RPC handlers and the dashboard.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from emflow.lattice.state import Lattice, RunLattice

PLUGIN_NAME = "emflow-lattice"


# --------------------------------------------------------------------------- keys


def parse_key(
    key: Any, known: dict[str, tuple[str, str]] | None = None
) -> tuple[str, str, int] | None:
    """``("emflow-<stage>-<run_id>", index)`` -> ``(run_id, stage, index)``; None for other keys.

    ``known`` maps key prefixes registered by the driver to ``(run_id, stage)``
    (exact even when names contain ``-``); otherwise the stage is the text up
    to the first ``-`` after ``emflow-``.
    """
    if type(key) is not tuple or len(key) != 2:
        return None
    prefix, index = key
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("emflow-")
        or not isinstance(index, int)
    ):
        return None
    if known is not None and prefix in known:
        run_id, stage = known[prefix]
        return run_id, stage, index
    stage, sep, run_id = prefix[len("emflow-") :].partition("-")
    if not sep or not stage:
        return None
    return run_id, stage, index


# --------------------------------------------------------------------------- scheduler plugin


class LatticePlugin(SchedulerPlugin):
    """Holds the :class:`Lattice` on the scheduler, fed by ``emflow-*`` task transitions.

    Installed by :func:`emflow.dask_preload.dask_setup` (schedulers emflow did
    not start) or by :func:`ensure_plugin` (``client.register_plugin``;
    idempotent). Serves RPC handlers ``emflow_begin_stage``, ``emflow_lattice``,
    ``emflow_unit``, ``emflow_pause``, ``emflow_resume``, ``emflow_cancel``,
    ``emflow_control`` and the dashboard (:mod:`emflow.dashboard`).
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.lattice = Lattice()
        self.known: dict[str, tuple[str, str]] = {}  # key prefix -> (run_id, stage)
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        if self.scheduler is scheduler:
            return
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "emflow_begin_stage": self.begin_stage,
                "emflow_lattice": self.snapshot,
                "emflow_unit": self.unit,
                "emflow_pause": self.pause,
                "emflow_resume": self.resume,
                "emflow_cancel": self.cancel,
                "emflow_control": self.control,
            }
        )
        from emflow import dashboard

        dashboard.install(scheduler, self)

    # -- RPC handlers (called as ``await client.scheduler.emflow_pause(run_id=...)``)
    def begin_stage(
        self,
        run_id: str,
        stage: str,
        total: int,
        prefix: str,
        skipped: list[int] | None = None,
        orphaned: list[int] | None = None,
        run_dir: str | None = None,
        session: str | None = None,
    ) -> None:
        self.known[prefix] = (run_id, stage)
        self.lattice.begin_stage(
            run_id,
            stage,
            total,
            skipped=skipped or (),
            orphaned=orphaned or (),
            run_dir=run_dir,
            session=session,
        )

    def snapshot(self, run_id: str | None = None, cells: bool = True) -> dict[str, Any]:
        return self.lattice.snapshot(run_id, cells=cells)

    def unit(self, run_id: str, stage: str, index: int) -> dict[str, Any]:
        return self.lattice.unit(run_id, stage, index)

    def _runs(self, run_id: str | None) -> list[RunLattice]:
        if run_id is None:
            return list(self.lattice.runs.values())
        return [self.lattice.run(run_id)]

    def pause(self, run_id: str | None = None, stage: str | None = None) -> dict[str, Any]:
        for r in self._runs(run_id):
            if stage is None:
                r.paused = True
            else:
                r.paused_stages.add(stage)
        return {"runs": [r.run_id for r in self._runs(run_id)], "paused": True, "stage": stage}

    def resume(self, run_id: str | None = None, stage: str | None = None) -> dict[str, Any]:
        for r in self._runs(run_id):
            if stage is None:
                r.paused = False
                r.paused_stages.clear()
            else:
                r.paused_stages.discard(stage)
        return {"runs": [r.run_id for r in self._runs(run_id)], "paused": False, "stage": stage}

    def cancel(self, run_id: str | None = None) -> dict[str, Any]:
        for r in self._runs(run_id):
            r.cancelled = True
        return {"runs": [r.run_id for r in self._runs(run_id)], "cancelled": True}

    def control(self, run_id: str, stage: str | None = None) -> dict[str, bool]:
        r = self.lattice.runs.get(run_id)
        if r is None:
            return {"paused": False, "cancelled": False}
        return {"paused": r.is_paused(stage), "cancelled": r.cancelled}

    # -- scheduler hooks
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        parsed = parse_key(key, self.known)
        if parsed is None:
            return
        run_id, stage, index = parsed
        if finish == "processing":
            ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
            worker = ts.processing_on.address if ts is not None and ts.processing_on else None
            self.lattice.apply(run_id, stage, index, "start", worker=worker)
        elif start == "processing" and finish == "memory":
            self.lattice.apply(run_id, stage, index, "finish", worker=kwargs.get("worker"))
        elif start == "processing" and finish == "erred":
            text = kwargs.get("exception_text") or str(kwargs.get("exception") or "error")
            self.lattice.apply(
                run_id, stage, index, "fail", worker=kwargs.get("worker"), error=text
            )
        elif start == "processing":  # worker lost, task cancelled or released
            self.lattice.apply(run_id, stage, index, "requeue")


def ensure_plugin(client: Any) -> None:
    """Register :class:`LatticePlugin` on the client's scheduler unless it is there (preload)."""
    client.register_plugin(LatticePlugin(), name=PLUGIN_NAME)  # idempotent: class attribute
