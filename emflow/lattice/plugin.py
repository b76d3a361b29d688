"""The Dask scheduler side of the lattice: :class:`LatticePlugin`, :func:`ensure_plugin`, task keys.

:func:`parse_key` maps task keys ``("emflow-<stage>-<run_id>", index)`` to
``(run_id, stage, index)`` (:func:`parse_batch` the keys of batch tasks, several units each);
the plugin feeds a :class:`~emflow.lattice.state.Lattice` from scheduler transitions (a task
assigned to a worker is *queued*) and from the start gate every unit passes on its worker
(:meth:`LatticePlugin.gate`: only then is it *running*; a paused or cancelled run refuses it,
so no unit starts after a pause was acknowledged). It serves the ``emflow_*`` RPC handlers and
the dashboard, and keeps the unit events (started on a worker, lost with its worker) the driver
copies to the journal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from emflow.lattice import gate as wgate
from emflow.lattice.state import Lattice, Q, R, RunLattice

logger = logging.getLogger(__name__)

PLUGIN_NAME = "emflow-lattice"
EVENTS_MAX = 100_000  # unit events kept per run for the driver (oldest dropped beyond)
ACK_TIMEOUT_S = 60.0  # a pause waits this long at most for a worker to take the new gate table


# --------------------------------------------------------------------------- keys


def parse_key(
    key: Any, known: dict[str, tuple[str, str]] | None = None
) -> tuple[str, str, int] | None:
    """``("emflow-<stage>-<run_id>", index)`` -> ``(run_id, stage, index)``; None for other keys.

    ``known`` maps key prefixes registered by the driver to ``(run_id, stage)``
    (exact even when names contain ``-``); otherwise the stage is the text up
    to the first ``-`` after ``emflow-``.
    """
    if type(key) not in (tuple, list) or len(key) != 2:
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


def parse_batch(
    key: Any, known: dict[str, tuple[str, str]]
) -> tuple[str, str, tuple[int, ...]] | None:
    """``("emflow-<stage>-<run_id>", (i, j, ...))`` or ``(..., (i, j, ...), generation)`` (a
    batch task: units i, j, ... of a stage run one after another, see
    :func:`emflow.lattice.execute.durable_batch` and ``batch_key``) -> ``(run_id, stage,
    indices)``; None for other keys. Only prefixes the driver registered are batches."""
    if type(key) is not tuple or len(key) not in (2, 3) or type(key[1]) is not tuple:
        return None
    if len(key) == 3 and type(key[2]) is not int:
        return None
    found = known.get(key[0]) if isinstance(key[0], str) else None
    if found is None or not all(type(i) is int for i in key[1]):
        return None
    return found[0], found[1], key[1]


# --------------------------------------------------------------------------- scheduler plugin


class LatticePlugin(SchedulerPlugin):
    """Holds the :class:`Lattice` on the scheduler, fed by ``emflow-*`` task transitions.

    Installed by :func:`emflow.dask_preload.dask_setup` (schedulers emflow did
    not start) or by :func:`ensure_plugin` (``client.register_plugin``;
    idempotent). Serves RPC handlers ``emflow_plan``, ``emflow_begin_stage``,
    ``emflow_lattice``, ``emflow_unit``, ``emflow_pause``, ``emflow_resume``,
    ``emflow_cancel``, ``emflow_control``, ``emflow_gate``, ``emflow_report`` and the
    dashboard (:mod:`emflow.dashboard`).
    """

    name = PLUGIN_NAME
    idempotent = True
    #: units start from their worker's gate table (emflow.lattice.gate); False: every unit asks
    #: the scheduler (a round trip each) -- for tests that act at the instant a unit starts
    local_gate = True

    def __init__(self) -> None:
        self.lattice = Lattice()
        self.known: dict[str, tuple[str, str]] = {}  # key prefix -> (run_id, stage)
        self.refused: set[tuple[str, int]] = set()  # tasks turned away by the gate
        self.events: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # run -> (base, list)
        self.scheduler: Any = None
        # the gate table pushed to workers (emflow.lattice.gate): prefix -> "go" | "stop"
        self.table: dict[str, str] = {}
        self.version = 0
        self.gated: set[str] = set()  # workers holding a table (they said hello)
        self.acked: dict[str, int] = {}  # worker -> last table version it acknowledged
        self.receivers: dict[str, str] = {}  # key prefix -> client id of the stage's driver

    async def start(self, scheduler: Any) -> None:
        if self.scheduler is scheduler:
            return
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "emflow_plan": self._pushing(self.plan),
                "emflow_begin_stage": self._pushing(self.begin_stage),
                "emflow_lattice": self.snapshot,
                "emflow_unit": self.unit,
                "emflow_pause": self._pushing(self.pause),
                "emflow_resume": self._pushing(self.resume),
                "emflow_cancel": self._pushing(self.cancel),
                "emflow_control": self.control,
                "emflow_gate": self._pushing(self.gate),
                "emflow_report": self.report,
                wgate.RPC_HELLO: self.hello,
            }
        )
        scheduler.stream_handlers.update(
            {wgate.OP_PASSED: self.passed, wgate.OP_ACK: self.ack, wgate.OP_RESULT: self.result}
        )
        from emflow import dashboard

        dashboard.install(scheduler, self)

    # -- events for the driver's journal
    def _event(self, run_id: str, **rec: Any) -> None:
        base, events = self.events.setdefault(run_id, (0, []))
        events.append({"t": round(time.time(), 3), **rec})
        if len(events) > EVENTS_MAX:
            drop = len(events) - EVENTS_MAX
            del events[:drop]
            self.events[run_id] = (base + drop, events)

    # -- the gate table on the workers (emflow.lattice.gate)
    def _table(self) -> dict[str, str]:
        """What a worker may decide alone: go or stop per key prefix (absent: ask)."""
        table: dict[str, str] = {}
        if not self.local_gate:
            return table
        for prefix, (run_id, stage) in self.known.items():
            r = self.lattice.runs.get(run_id)
            if r is None:
                continue
            if r.cancelled or r.is_paused(stage):
                table[prefix] = wgate.STOP
            elif stage not in r.hold:  # a held stage counts its starts here: ask
                table[prefix] = wgate.GO
        return table

    def _push(self) -> int | None:
        """Send the gate table to the workers if it changed; the version they must acknowledge
        before a unit they let through no longer could (a prefix left "go"), else None."""
        table = self._table()
        if table == self.table:
            return None
        narrowed = any(v == wgate.GO and table.get(p) != wgate.GO for p, v in self.table.items())
        self.table, self.version = table, self.version + 1
        msg = {"op": wgate.OP_TABLE, "version": self.version, "table": table}
        comms = getattr(self.scheduler, "stream_comms", {}) if self.scheduler is not None else {}
        for w in list(self.gated):
            comm = comms.get(w)
            if comm is None:
                self.gated.discard(w)
                continue
            try:
                comm.send(dict(msg))
            except Exception:  # its stream closed: it is leaving (remove_worker follows)
                self.gated.discard(w)
        return self.version if narrowed else None

    async def _settle(self, version: int) -> None:
        """Wait until every worker holding a table acknowledged ``version`` (or left)."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            workers = self.scheduler.workers if self.scheduler is not None else {}
            late = [w for w in self.gated if w in workers and self.acked.get(w, -1) < version]
            if not late:
                return
            if time.monotonic() > deadline:
                logger.warning(
                    "workers %s did not take the paused gate within %.0f s", late, ACK_TIMEOUT_S
                )
                return
            await asyncio.sleep(0.002)

    def _pushing(self, handler: Any) -> Any:
        """An RPC handler that pushes the gate table after ``handler`` changed the switches and,
        when units could have started under the old one, answers once the workers took it."""

        async def rpc(*args: Any, **kw: Any) -> Any:
            kw.pop("comm", None)
            ans = handler(*args, **kw)
            version = self._push()
            if version is not None:
                await self._settle(version)
            return ans

        rpc.__name__ = getattr(handler, "__name__", "rpc")
        return rpc

    def hello(self, worker: str | None = None, **_: Any) -> dict[str, Any]:
        """A worker's gate plugin joins: it gets the table; later changes reach it on its stream."""
        if worker is not None:
            self.gated.add(worker)
        return {"version": self.version, "table": self.table, "results": True}

    def ack(self, version: int, worker: str | None = None) -> None:
        if worker is not None:
            self.acked[worker] = max(version, self.acked.get(worker, -1))

    def passed(
        self, prefix: str, index: int, go: bool, t: float | None = None, worker: str | None = None
    ) -> None:
        """A unit passed (or was refused by) the gate table on its worker."""
        key = (prefix, int(index))
        parsed = parse_key(key, self.known)
        if parsed is None:
            return
        run_id, stage, index = parsed
        r = self.lattice.runs.get(run_id)
        if r is None:
            return
        if not go:
            self._refuse(key, run_id, stage, index, worker)
            return
        self._start(run_id, stage, index, worker, t)

    def result(
        self,
        prefix: str,
        index: int,
        payload: bytes,
        worker: str | None = None,
        finished: bool | None = None,
    ) -> None:
        """A unit's payload from its worker: forwarded to the stage's driver as a client event
        (ahead of the task's completion on the same stream; see emflow.lattice.gate).
        ``finished``: a unit of a batch task ran to its end (it is done from now on)."""
        parsed = parse_key((prefix, int(index)), self.known)
        if parsed is not None and parsed[0] not in self.lattice.runs:
            parsed = None
        if finished and parsed is not None:
            self.lattice.apply(parsed[0], parsed[1], parsed[2], "finish", worker=worker)
        client = self.receivers.get(prefix)
        comms = getattr(self.scheduler, "client_comms", {}) if self.scheduler is not None else {}
        comm = comms.get(client) if client is not None else None
        if comm is None:
            return  # the driver gathers the task's result instead
        # the attempt this result is of (the scheduler counts them: a unit started from a
        # worker's table does not know whether an earlier attempt was lost with its worker)
        attempt = None
        if parsed is not None:
            cell = self.lattice.run(parsed[0]).stage(parsed[1]).cells.get(parsed[2])
            attempt = cell.attempts if cell is not None and cell.attempts else None
        topic = wgate.RESULT_TOPIC.format(prefix=prefix)
        try:
            comm.send({"op": "event", "topic": topic, "event": [int(index), payload, attempt]})
        except Exception:
            pass

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.gated.discard(worker)
        self.acked.pop(worker, None)

    # -- RPC handlers (called as ``await client.scheduler.emflow_pause(run_id=...)``)
    def plan(
        self,
        run_id: str,
        stages: list[dict[str, Any]],
        run_dir: str | None = None,
        session: str | None = None,
    ) -> None:
        """Announce every stage of a run with its unit count (and labels) before it begins."""
        self.lattice.plan(run_id, stages, run_dir=run_dir, session=session)

    def begin_stage(
        self,
        run_id: str,
        stage: str,
        total: int,
        prefix: str,
        skipped: list[int] | None = None,
        orphaned: list[int] | None = None,
        redo: list[int] | None = None,
        labels: list[str] | None = None,
        run_dir: str | None = None,
        session: str | None = None,
        client: str | None = None,
    ) -> None:
        self.known[prefix] = (run_id, stage)
        if client is not None:  # its units' results go to this driver (emflow.lattice.gate)
            self.receivers[prefix] = client
        self.lattice.begin_stage(
            run_id,
            stage,
            total,
            skipped=skipped or (),
            orphaned=orphaned or (),
            redo=redo or (),
            labels=labels,
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

    def _unqueue(self, r: RunLattice) -> None:
        """Units queued on a worker of a paused/cancelled run go back to waiting at once.

        Their tasks are refused by :meth:`gate` when a worker gets to them.
        """
        for name, st in r.stages.items():
            if not r.cancelled and not r.is_paused(name):
                continue
            for i in [i for i in st.cells if st.codes[i] == ord(Q.code)]:
                self.lattice.apply(r.run_id, name, i, "requeue")

    def pause(
        self, run_id: str | None = None, stage: str | None = None, after: int | None = None
    ) -> dict[str, Any]:
        """Pause the run (or one stage): from now on no unit of it starts.

        ``after=N`` (with a stage): let N more units of the stage start, then pause it.
        """
        for r in self._runs(run_id):
            if after and stage is not None:
                r.hold[stage] = int(after)
                continue
            r.set_paused(True, stage)
            self._unqueue(r)
        return {"runs": [r.run_id for r in self._runs(run_id)], "paused": True, "stage": stage}

    def resume(self, run_id: str | None = None, stage: str | None = None) -> dict[str, Any]:
        for r in self._runs(run_id):
            r.set_paused(False, stage)
        return {"runs": [r.run_id for r in self._runs(run_id)], "paused": False, "stage": stage}

    def cancel(self, run_id: str | None = None) -> dict[str, Any]:
        for r in self._runs(run_id):
            r.cancelled = True
            self._unqueue(r)
        return {"runs": [r.run_id for r in self._runs(run_id)], "cancelled": True}

    def control(
        self, run_id: str, stage: str | None = None, cursor: int | None = None
    ) -> dict[str, Any]:
        """The driver's poll: pause/cancel switches, plus unit events after ``cursor``."""
        r = self.lattice.runs.get(run_id)
        ans: dict[str, Any] = {
            "paused": r.is_paused(stage) if r is not None else False,
            "cancelled": r.cancelled if r is not None else False,
        }
        if cursor is not None:
            base, events = self.events.get(run_id, (0, []))
            if cursor > base + len(events):  # a cursor of another scheduler: start over
                cursor = base
            start = max(0, cursor - base)
            ans["events"] = events[start:]
            ans["cursor"] = base + len(events)
            if start:  # acknowledged by the driver: forget them
                del events[:start]
                self.events[run_id] = (base + start, events)
        return ans

    def gate(
        self, prefix: str, index: int, worker: str | None = None, task: bool = True
    ) -> dict[str, Any]:
        """Called by a unit before it starts (on its worker, or in the driver): may it start?

        Refused while its run or stage is paused or the run is cancelled: the unit goes
        back to waiting and its task returns without running. Otherwise the unit is
        *running* from now on; the answer holds its attempt number.
        """
        key = (prefix, int(index))
        parsed = parse_key(key, self.known)
        if parsed is None:
            return {"go": True, "attempt": None}
        run_id, stage, index = parsed
        r = self.lattice.runs.get(run_id)
        if r is None:
            return {"go": True, "attempt": None}
        if r.cancelled or r.is_paused(stage):
            self._refuse(key if task else None, run_id, stage, index, worker)
            return {"go": False, "attempt": None}
        if stage in r.hold:
            r.hold[stage] -= 1
            if r.hold[stage] <= 0:
                del r.hold[stage]
                r.set_paused(True, stage)  # this unit is the last one let through
                self._unqueue(r)
        return {"go": True, "attempt": self._start(run_id, stage, index, worker)}

    def _refuse(
        self, key: tuple[str, int] | None, run_id: str, stage: str, index: int, worker: str | None
    ) -> None:
        """A unit refused at the gate (paused or cancelled) waits again; ``key``: its task
        returns without running (None: the driver runs the unit itself)."""
        if key is not None:
            self.refused.add(key)
        if self.lattice.run(run_id).stage(stage).state(index) in (Q, R):
            self.lattice.apply(run_id, stage, index, "requeue", worker=worker)

    def _start(
        self, run_id: str, stage: str, index: int, worker: str | None, t: float | None = None
    ) -> int:
        """A unit let through the gate runs from now on (a journal event); its attempt number."""
        self.lattice.apply(run_id, stage, index, "start", worker=worker)
        st = self.lattice.run(run_id).stage(stage)
        attempt = st.cells[index].attempts if index in st.cells else 1
        self._event(
            run_id, event="start", stage=stage, index=index, worker=worker, attempt=attempt,
            **({"t": t} if t is not None else {}),
        )  # fmt: skip
        return attempt

    def report(
        self,
        run_id: str,
        stage: str,
        index: int,
        transition: str,
        worker: str | None = None,
        error: str | None = None,
    ) -> bool:
        """A transition observed by the driver itself (units it runs in-process)."""
        return self.lattice.apply(run_id, stage, index, transition, worker=worker, error=error)

    # -- scheduler hooks
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        parsed = parse_key(key, self.known)
        if parsed is None:
            batch = parse_batch(key, self.known)
            if batch is not None:
                self._batch_transition(key, *batch, start, finish, kwargs)
            return
        run_id, stage, index = parsed
        if finish == "processing":
            ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
            worker = ts.processing_on.address if ts is not None and ts.processing_on else None
            self.lattice.apply(run_id, stage, index, "queue", worker=worker)
            return
        if start != "processing":
            return
        refused = key in self.refused
        self.refused.discard(key)
        st = self.lattice.run(run_id).stage(stage)
        if finish == "memory":
            if not refused:  # a refused task returned without running: it is waiting
                self.lattice.apply(run_id, stage, index, "finish", worker=kwargs.get("worker"))
        elif finish == "erred":
            text = kwargs.get("exception_text") or str(kwargs.get("exception") or "error")
            self.lattice.apply(
                run_id, stage, index, "fail", worker=kwargs.get("worker"), error=text
            )
        elif st.state(index) == R:  # started on a worker that is gone (or was cancelled)
            self._lost_or_requeued(run_id, stage, index, str(kwargs.get("stimulus_id") or ""))
        elif st.state(index) == Q:  # queued on a worker that is gone, or released
            self.lattice.apply(run_id, stage, index, "requeue")

    def _batch_transition(
        self,
        key: tuple[Any, ...],
        run_id: str,
        stage: str,
        indices: tuple[int, ...],
        start: str,
        finish: str,
        kwargs: dict[str, Any],
    ) -> None:
        """:meth:`transition` of a batch task, applied to each of its units: queued together;
        each started by its own gate notice and done by its own result (:meth:`result`); when
        the task ends, units still queued (refused at the gate, or after a unit that failed) go
        back to waiting, a unit running when its task erred failed, and units running when it
        was lost with its worker are lost (their batch reruns; finished units keep their
        markers and are not run again)."""
        apply = self.lattice.apply
        prefix = key[0]
        if finish == "processing":
            ts = self.scheduler.tasks.get(key) if self.scheduler else None
            worker = ts.processing_on.address if ts is not None and ts.processing_on else None
            for i in indices:  # a unit already done (an earlier attempt of the batch) stays done
                apply(run_id, stage, i, "queue", worker=worker)
            return
        if start != "processing":
            return
        self.refused.difference_update((prefix, i) for i in indices)
        st = self.lattice.run(run_id).stage(stage)
        if finish == "memory":
            for i in indices:
                state = st.state(i)
                if state == Q:  # not let through the gate
                    apply(run_id, stage, i, "requeue")
                elif state == R:  # ran, its result not streamed (a worker without the table)
                    apply(run_id, stage, i, "finish", worker=kwargs.get("worker"))
            return
        text = kwargs.get("exception_text") or str(kwargs.get("exception") or "error")
        stim = str(kwargs.get("stimulus_id") or "")
        for i in indices:
            state = st.state(i)
            if state == Q:
                apply(run_id, stage, i, "requeue")
            elif state == R and finish == "erred":
                apply(run_id, stage, i, "fail", worker=kwargs.get("worker"), error=text)
            elif state == R:
                self._lost_or_requeued(run_id, stage, i, stim)

    def _lost_or_requeued(self, run_id: str, stage: str, index: int, stimulus: str) -> None:
        """A running unit whose task left its worker without a result: lost (a journal event)
        when that worker is gone or the ``stimulus`` id names a worker, else waiting again."""
        cell = self.lattice.run(run_id).stage(stage).cells.get(index)
        worker = cell.worker if cell is not None else None
        gone = self.scheduler is not None and worker not in self.scheduler.workers
        if gone or "worker" in stimulus:
            self.lattice.lose(run_id, stage, index, worker=worker, reason="worker lost")
            self._event(
                run_id, event="lost", stage=stage, index=index, worker=worker,
                reason="worker lost",
            )  # fmt: skip
        else:
            self.lattice.apply(run_id, stage, index, "requeue")


def ensure_plugin(client: Any) -> None:
    """Register :class:`LatticePlugin` on the client's scheduler unless it is there (preload),
    and the workers' start gate (:mod:`emflow.lattice.gate`; idempotent, joining workers get it)."""
    client.register_plugin(LatticePlugin(), name=PLUGIN_NAME)  # idempotent: class attribute
    client.register_plugin(wgate.GateWorkerPlugin(), name=wgate.GATE_PLUGIN)
