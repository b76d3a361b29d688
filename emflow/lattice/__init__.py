"""Per-unit bookkeeping (the lattice): state machine, durable markers, journal, scheduler plugin.

Representation
--------------
A run is a sequence of *stages* (``"stats"``, ``"features"``, ``"match"``, ...);
a stage is a list of independent *units* numbered ``0 .. total-1``. Every unit
(cell of the stage x unit lattice) is in one :class:`UnitState`::

    waiting --queue--> queued --start--> running --finish--> done | redone
       ^  |              |                  |  \\--fail----> failed --start--> running (retry)
       |  |              +--requeue--+------+--requeue/lost--> waiting
       |  +--skip----> skipped   (done by an earlier run: its marker exists)
       +--+--orphan--> orphaned  (an upstream unit failed)

*queued*: the scheduler assigned the unit's task to a worker; *running*: the unit
passed the run's start gate on that worker (a paused or cancelled run refuses it,
and it goes back to waiting). A unit finishes *redone* when an earlier attempt
failed or was lost with its worker (or with a driver that died).

Transitions are named (:data:`TRANSITIONS`); a transition that is not allowed
from the current state (a late duplicate ``finish`` of a unit already done, a
result of a lost worker arriving after the retry started...) is rejected and
counted, never applied.

Durable truth lives outside Dask, in the run folder ``run_dir``:

``run.json``
    the recipe fingerprint (:func:`open_run`).
``done/<stage>/<index>.json``
    one marker per unit, written atomically (tmp + fsync + rename) on the
    worker *after* the unit function returned, i.e. after its output is on
    disk; it holds the unit's (small, JSON) result, worker and timings. The
    markers are the source of truth for resume.
``journal.jsonl``
    append-only event log written by the driver: sessions, the planned stages,
    and for every unit: started (worker, time, attempt), done, failed (error),
    lost (with its worker, or with a driver that died), skipped, orphaned; pause,
    resume, cancel. An index over the markers, reconciled with them when a run
    resumes. ``emflow status`` reads it when the run is not live.
``scheduler.json``
    address of the scheduler of the live run, the driver's pid and host, and the
    paths of the client credentials, for ``emflow status/pause/resume/cancel``.
``secrets/``
    (0700, files 0600) temporary TLS certificates of a live run: the client copies
    and the worker jobs' files; removed when the driver ends, or by the next
    driver when it died (:mod:`emflow.cluster.secrets`).

The in-memory lattice of a live run is held by :class:`LatticePlugin` on the
Dask scheduler, fed by task keys ``("emflow-<stage>-<run_id>", index)``; it
serves the ``/emflow`` dashboard page, ``/emflow/lattice.json`` and the
``emflow_*`` RPC handlers (pause, resume, cancel, snapshot).

Modules
-------
:mod:`~emflow.lattice.state`
    :class:`UnitState`, :data:`TRANSITIONS`, :class:`Lattice` (per-stage aggregation).
:mod:`~emflow.lattice.plugin`
    :class:`LatticePlugin` (runs in the scheduler: transitions, the units' start gate,
    pause/cancel, unit events for the journal), :func:`ensure_plugin`, :func:`parse_key`.
:mod:`~emflow.lattice.gate`
    :class:`GateWorkerPlugin`: the start gate on a worker, a table of go/stop per stage the
    plugin pushes (a pause is answered once every worker took it), so a unit starts without
    a round trip to the scheduler.
:mod:`~emflow.lattice.execute`
    :func:`run_stage`: a stage's units serially, on Dask in a bounded window, or in the
    driver through the same gate, with markers; :func:`declare_plan`.
:mod:`~emflow.lattice.markers`
    atomic JSON markers: :func:`write_marker`, :func:`read_marker`, :func:`done_markers`,
    :func:`sync_markers`.
:mod:`~emflow.lattice.journal`
    :class:`Journal`, :func:`read_journal`, :func:`summarize_journal`, sessions and the
    units earlier sessions left unfinished (:func:`earlier_attempts`).
:mod:`~emflow.lattice.rundir`
    :func:`open_run`; :func:`announce_run` / :func:`retire_run` (``scheduler.json`` and the
    client credentials of a live run) and :func:`connect_run` (a client to it, or why not).
:mod:`~emflow.lattice.errors`
    :class:`IncompleteRun`, :class:`RunCancelled`.
"""

from __future__ import annotations

from emflow.lattice.errors import IncompleteRun, RunCancelled
from emflow.lattice.gate import GATE_PLUGIN as GATE_PLUGIN
from emflow.lattice.gate import RESULT_TOPIC as RESULT_TOPIC
from emflow.lattice.gate import GateWorkerPlugin as GateWorkerPlugin
from emflow.lattice.journal import _SESSIONS as _SESSIONS
from emflow.lattice.journal import JOURNAL as JOURNAL
from emflow.lattice.journal import (
    Journal,
    earlier_attempts,
    read_journal,
    session_id,
    start_session,
    summarize_journal,
)
from emflow.lattice.journal import journal_done as journal_done
from emflow.lattice.markers import MARKERS as MARKERS
from emflow.lattice.markers import RUN_JSON as RUN_JSON
from emflow.lattice.markers import SCHEDULER_JSON as SCHEDULER_JSON
from emflow.lattice.markers import _fsync_dir as _fsync_dir
from emflow.lattice.markers import done_markers, marker_path, reserve_markers, sync_markers
from emflow.lattice.markers import write_marker
from emflow.lattice.markers import read_marker as read_marker
from emflow.lattice.plugin import PLUGIN_NAME as PLUGIN_NAME
from emflow.lattice.plugin import LatticePlugin, parse_key
from emflow.lattice.plugin import ensure_plugin as ensure_plugin
from emflow.lattice.rundir import RunContact as RunContact
from emflow.lattice.rundir import announce_run as announce_run
from emflow.lattice.rundir import connect_run as connect_run
from emflow.lattice.rundir import live_run as live_run
from emflow.lattice.rundir import open_run
from emflow.lattice.rundir import read_scheduler_file as read_scheduler_file
from emflow.lattice.rundir import retire_run as retire_run
from emflow.lattice.rundir import write_scheduler_file as write_scheduler_file
from emflow.lattice.state import _CODE as _CODE
from emflow.lattice.state import _FROM_CODE as _FROM_CODE
from emflow.lattice.state import HISTORY_MAX as HISTORY_MAX
from emflow.lattice.state import TRANSITIONS, Lattice, UnitState
from emflow.lattice.state import Cell as Cell
from emflow.lattice.state import D as D
from emflow.lattice.state import E as E
from emflow.lattice.state import F as F
from emflow.lattice.state import O as O
from emflow.lattice.state import Q as Q
from emflow.lattice.state import R as R
from emflow.lattice.state import RunLattice as RunLattice
from emflow.lattice.state import S as S
from emflow.lattice.state import StageLattice as StageLattice
from emflow.lattice.state import W as W

__all__ = [
    "TRANSITIONS",
    "IncompleteRun",
    "Journal",
    "Lattice",
    "LatticePlugin",
    "RunCancelled",
    "UnitState",
    "done_markers",
    "earlier_attempts",
    "marker_path",
    "open_run",
    "parse_key",
    "read_journal",
    "reserve_markers",
    "session_id",
    "start_session",
    "summarize_journal",
    "sync_markers",
    "write_marker",
]
