"""The units' start gate on a worker: a table the scheduler pushes, read without a round trip.

Every unit passes the run's start gate on its worker before it runs (see
:meth:`~emflow.lattice.plugin.LatticePlugin.gate`). Asking the scheduler costs a round trip
per unit; instead the lattice plugin pushes a *gate table* ``{key prefix: "go" | "stop"}``
to every worker on the worker's own stream (:data:`GATE_PLUGIN` installs the handler), and a
unit reads it locally:

* ``go``: the unit starts; a ``passed`` notice follows on the worker's stream (so the
  lattice marks it running, in order before its result);
* ``stop`` (run or stage paused or cancelled): the unit returns without running;
* no entry (a stage held by ``EMFLOW_PAUSE_AFTER``: the scheduler counts its starts; a
  prefix not announced yet) or no table yet: the unit asks the scheduler as before.

Why a pause still holds: the plugin answers a pause or cancel only after every worker
acknowledged the new table on its stream. The table is swapped under a lock that each
local check also takes, and a check queues its ``passed`` notice before it releases the lock,
so every unit let through before the swap is reported to the scheduler before that
worker's acknowledgement: no unit starts after the pause was answered, and the ones that
started before are running, not queued, in the lattice when the answer leaves.

A unit's payload (its small result dict) travels the same way: on the worker's stream to
the scheduler, which forwards it with the unit's attempt number (it counts them) on the
driver's stream as a client event (:data:`RESULT_TOPIC`), in order ahead of the task's
completion -- so the driver reads it without a gather round trip through the scheduler
(the task's result stays the fallback).
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

GATE_PLUGIN = "emflow-gate"
GO, STOP = "go", "stop"
# stream op: scheduler -> worker
OP_TABLE = "emflow_gate_table"
# stream ops: worker -> scheduler
OP_PASSED, OP_ACK, OP_RESULT = "emflow_gate_passed", "emflow_gate_ack", "emflow_unit_result"
#: the client event topic on which the driver of a stage receives its units' results
RESULT_TOPIC = "emflow-result-{prefix}"
# RPC on the scheduler: a worker joins (None when the scheduler's plugin has no table)
RPC_HELLO = "emflow_gate_hello"


def _send(worker: Any, msg: dict[str, Any]) -> None:
    """Queue a message on the worker's stream to the scheduler (on the worker's event loop)."""
    try:
        worker.batched_stream.send(msg)
    except Exception:  # the stream closed: the worker is leaving; its units are lost anyway
        pass


def _before_exit(worker: Any) -> None:
    """A worker process a nanny spawned ends once its worker closed: freeze the objects it holds
    so the interpreter's teardown does not traverse them in a last garbage collection (about
    0.2-0.4 CPU-s for the modules a worker imports, which ``LocalCluster.close`` waits for)."""
    import gc
    import multiprocessing

    from distributed.core import Status

    closing = getattr(worker, "status", None) in (Status.closing, Status.closed)
    if closing and multiprocessing.parent_process() is not None:
        gc.freeze()


class GateWorkerPlugin(WorkerPlugin):
    """Holds the gate table on a worker; :meth:`check` is the local start gate."""

    name = GATE_PLUGIN
    idempotent = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = -1
        self.table: dict[str, str] | None = None  # None: no table yet (ask the scheduler)
        self.results = False  # the scheduler forwards unit results to their driver
        self.worker: Any = None

    def __getstate__(self) -> dict[str, Any]:  # sent to workers: no lock, no state
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        worker.stream_handlers[OP_TABLE] = self._on_table
        try:  # a scheduler whose lattice plugin pushes no table: every unit asks it
            ans = await worker.scheduler.emflow_gate_hello(worker=worker.address)
        except Exception:
            return
        if isinstance(ans, dict):
            self.results = bool(ans.get("results"))
            self._on_table(version=ans["version"], table=ans["table"], ack=False)

    def teardown(self, worker: Any) -> None:
        with self.lock:
            self.table = None
        _before_exit(worker)

    # -- on the worker's event loop (the scheduler's stream)
    def _on_table(self, version: int, table: dict[str, str], ack: bool = True) -> None:
        with self.lock:
            if version > self.version:
                self.version, self.table = version, dict(table)
        if ack:  # after the 'passed' notices queued by units let through under the old table
            self.worker.loop.add_callback(_send, self.worker, {"op": OP_ACK, "version": version})

    # -- in the unit's thread
    def check(self, key: tuple[str, int]) -> dict[str, Any] | None:
        """The gate's answer for the unit ``key`` from the table; None: ask the scheduler."""
        prefix, index = key[0], int(key[1])
        with self.lock:
            if self.table is None:
                return None
            what = self.table.get(prefix)
            if what is None:
                return None
            go = what == GO
            notice = {"op": OP_PASSED, "prefix": prefix, "index": index, "go": go}
            notice["t"] = round(time.time(), 3)
            self.worker.loop.add_callback(_send, self.worker, notice)  # before the lock goes
        return {"go": go, "attempt": None}

    def send_result(
        self, key: tuple[str, int], payload: dict[str, Any], batch: bool = False
    ) -> None:
        """Send a unit's payload to its driver through the scheduler's streams, ahead of the
        task's own completion, so the driver needs no gather round trip (it still can).
        ``batch``: the unit is one of a batch task's (the lattice marks it done on receipt)."""
        if not self.results:
            return
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        msg = {"op": OP_RESULT, "prefix": key[0], "index": int(key[1]), "payload": blob}
        if batch:  # the lattice marks the unit done now (its task ends after the batch)
            msg["finished"] = not payload.get("deferred")
        self.worker.loop.add_callback(_send, self.worker, msg)
