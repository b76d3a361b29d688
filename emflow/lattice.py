"""Per-unit bookkeeping (the lattice): state machine, durable markers, journal, scheduler plugin.

Representation
--------------
A run is a sequence of *stages* (``"stats"``, ``"features"``, ``"match"``, ...);
a stage is a list of independent *units* numbered ``0 .. total-1``. Every unit
(cell of the stage x unit lattice) is in one :class:`UnitState`::

    waiting --start--> running --finish--> done
       ^  |               |  \\--fail----> failed --start--> running (retry)
       |  |               \\--requeue--> waiting   (worker lost, cancelled)
       |  +--skip----> skipped   (done by an earlier run: its marker exists)
       +--+--orphan--> orphaned  (an upstream unit failed)

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
    append-only event log written by the driver (sessions, stages, done,
    failed, skipped, orphaned, pause, cancel); an index over the markers,
    reconciled with them when a run resumes. ``emflow status`` reads it.
``scheduler.json``
    address of the scheduler of the live run, for ``emflow status/pause/...``.

The in-memory lattice of a live run is held by :class:`LatticePlugin` on the
Dask scheduler, fed by task keys ``("emflow-<stage>-<run_id>", index)``; it
serves the ``/emflow`` dashboard page, ``/emflow/lattice.json`` and the
``emflow_*`` RPC handlers (pause, resume, cancel, snapshot).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from emflow.errors import EmflowError, OutputError

__all__ = [
    "TRANSITIONS",
    "IncompleteRun",
    "Journal",
    "Lattice",
    "LatticePlugin",
    "RunCancelled",
    "UnitState",
    "done_markers",
    "marker_path",
    "open_run",
    "parse_key",
    "read_journal",
    "session_id",
    "start_session",
    "summarize_journal",
    "write_marker",
]

PLUGIN_NAME = "emflow-lattice"
JOURNAL = "journal.jsonl"
RUN_JSON = "run.json"
SCHEDULER_JSON = "scheduler.json"
MARKERS = "done"
HISTORY_MAX = 16  # per-unit history entries kept in memory


class IncompleteRun(EmflowError):
    """Some units still failed after their retries; the output is incomplete but resumable."""

    exit_code = 3

    def __init__(self, message: str, failed: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.failed = failed or []

    @classmethod
    def from_failures(cls, failed: list[dict[str, Any]], run_dir: Path | None) -> IncompleteRun:
        shown = "; ".join(
            f"{f['stage']}[{f['index']}] after {f['attempts']} attempt(s): {f['error']}"
            for f in failed[:5]
        )
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        where = f" (see {Path(run_dir) / JOURNAL})" if run_dir else ""
        return cls(
            f"run incomplete: {len(failed)} unit(s) failed: {shown}{more}{where}; "
            "fix the cause and run again to redo only the missing units",
            failed,
        )


class RunCancelled(IncompleteRun):
    """The run was cancelled (``emflow cancel``); units already done stay done and resumable."""


class UnitState(str, Enum):
    """State of one unit of one stage."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    ORPHANED = "orphaned"

    @property
    def code(self) -> str:
        """One letter, used in the compact per-stage cell strings of the JSON snapshot."""
        return _CODE[self]


_CODE = {
    UnitState.WAITING: "w",
    UnitState.RUNNING: "r",
    UnitState.DONE: "d",
    UnitState.FAILED: "f",
    UnitState.SKIPPED: "s",
    UnitState.ORPHANED: "o",
}
_FROM_CODE = {v: k for k, v in _CODE.items()}

W, R, D, F, S, O = (  # noqa: E741
    UnitState.WAITING,
    UnitState.RUNNING,
    UnitState.DONE,
    UnitState.FAILED,
    UnitState.SKIPPED,
    UnitState.ORPHANED,
)
#: named transitions: name -> (allowed source states, target state)
TRANSITIONS: dict[str, tuple[frozenset[UnitState], UnitState]] = {
    "start": (frozenset({W, F}), R),
    "finish": (frozenset({R, W, F}), D),  # W/F: a result may overtake its 'start' report
    "fail": (frozenset({R, W}), F),
    "requeue": (frozenset({R}), W),
    "skip": (frozenset({W}), S),
    "orphan": (frozenset({W, F}), O),
}


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


# --------------------------------------------------------------------------- state


class Cell:
    """Details of one unit that left ``waiting``: attempts, worker, timings, error, history."""

    __slots__ = ("attempts", "end", "error", "history", "start", "worker")

    def __init__(self) -> None:
        self.attempts = 0
        self.worker: str | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.error: str | None = None
        self.history: list[tuple[float, str, str | None, str | None]] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "worker": self.worker,
            "start": self.start,
            "end": self.end,
            "error": self.error,
            "history": [list(h) for h in self.history],
        }


class StageLattice:
    """The units of one stage: a byte per unit (state letter) plus details of touched units."""

    def __init__(self, name: str, total: int = 0) -> None:
        self.name = name
        self.codes = bytearray(b"w" * total)
        self.cells: dict[int, Cell] = {}
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.finished_here = 0  # done in this session (not skipped), for the rate

    @property
    def total(self) -> int:
        return len(self.codes)

    def grow(self, total: int) -> None:
        if total > len(self.codes):
            self.codes.extend(b"w" * (total - len(self.codes)))

    def state(self, index: int) -> UnitState:
        return _FROM_CODE[chr(self.codes[index])] if index < len(self.codes) else W

    def counts(self) -> dict[str, int]:
        return {s.value: self.codes.count(s.code.encode()) for s in UnitState}

    def summary(self, now: float, *, cells: bool) -> dict[str, Any]:
        counts = self.counts()
        elapsed = (
            (self.last_end if counts["waiting"] + counts["running"] == 0 else None) or now
        ) - (self.first_start or now)
        rate = self.finished_here / elapsed if elapsed > 0 and self.finished_here else 0.0
        left = counts["waiting"] + counts["running"]
        failed = [
            {"index": i, **{k: v for k, v in self.cells[i].as_dict().items() if k != "history"}}
            for i in sorted(self.cells)
            if chr(self.codes[i]) == "f"
        ]
        out: dict[str, Any] = {
            "stage": self.name,
            "total": self.total,
            "counts": counts,
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(rate, 3),
            "eta_s": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None),
            "failed": failed,
        }
        if cells:
            out["cells"] = self.codes.decode()
        return out


class RunLattice:
    """All stages of one run (one ``run_id``) plus its pause/cancel switches."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.stages: dict[str, StageLattice] = {}
        self.paused = False
        self.paused_stages: set[str] = set()
        self.cancelled = False
        self.run_dir: str | None = None
        self.session: str | None = None  # driver session; a new one clears pause/cancel
        self.started = time.time()
        self.rejected = 0  # late duplicates / illegal transitions refused

    def stage(self, name: str) -> StageLattice:
        st = self.stages.get(name)
        if st is None:
            st = self.stages[name] = StageLattice(name)
        return st

    def is_paused(self, stage: str | None) -> bool:
        return self.paused or (stage is not None and stage in self.paused_stages)


class Lattice:
    """The stage x unit lattice of every run a scheduler (or a serial driver) knows.

    Pure bookkeeping, no Dask: :class:`LatticePlugin` feeds it from scheduler
    transitions; tests drive it directly.
    """

    def __init__(self) -> None:
        self.runs: dict[str, RunLattice] = {}

    max_runs = 20  # a long-lived scheduler keeps the lattices of this many runs

    def run(self, run_id: str) -> RunLattice:
        r = self.runs.get(run_id)
        if r is None:
            while len(self.runs) >= self.max_runs:
                del self.runs[next(iter(self.runs))]  # the oldest
            r = self.runs[run_id] = RunLattice(run_id)
        return r

    def begin_stage(
        self,
        run_id: str,
        stage: str,
        total: int,
        *,
        skipped: Iterable[int] = (),
        orphaned: Iterable[int] = (),
        run_dir: str | None = None,
        session: str | None = None,
    ) -> None:
        """Declare (or restart) a stage of ``total`` units, some already done (skipped) or orphaned.

        A new driver ``session`` of a known run (``emflow run`` again after a
        cancel) clears the run's pause and cancel switches.
        """
        r = self.run(run_id)
        if run_dir:
            r.run_dir = run_dir
        if session and session != r.session:
            if r.session is not None:
                r.paused, r.cancelled = False, False
                r.paused_stages.clear()
            r.session = session
        r.stages[stage] = StageLattice(stage, total)  # a stage begun again starts afresh
        for i in skipped:
            self.apply(run_id, stage, i, "skip")
        for i in orphaned:
            self.apply(run_id, stage, i, "orphan")

    def apply(
        self,
        run_id: str,
        stage: str,
        index: int,
        transition: str,
        *,
        worker: str | None = None,
        error: str | None = None,
        when: float | None = None,
    ) -> bool:
        """Apply a named transition to one unit; False (and nothing changes) when not allowed."""
        sources, target = TRANSITIONS[transition]
        r = self.run(run_id)
        st = r.stage(stage)
        st.grow(index + 1)
        if st.state(index) not in sources:
            r.rejected += 1
            return False
        now = time.time() if when is None else when
        st.codes[index] = ord(target.code)
        if transition in ("skip", "orphan"):
            return True
        cell = st.cells.get(index)
        if cell is None:
            cell = st.cells[index] = Cell()
        if transition == "start":
            cell.attempts += 1
            cell.start, cell.end, cell.worker = now, None, worker
            if st.first_start is None:
                st.first_start = now
        elif transition in ("finish", "fail"):
            cell.end = now
            cell.worker = worker or cell.worker
            if transition == "finish":
                cell.error = None
                cell.attempts = max(cell.attempts, 1)
                st.finished_here += 1
                st.last_end = now
            else:
                cell.error = error
        cell.history.append((round(now, 3), target.value, worker or cell.worker, error))
        del cell.history[:-HISTORY_MAX]
        return True

    def snapshot(self, run_id: str | None = None, *, cells: bool = True) -> dict[str, Any]:
        """JSON-ready view: per run and stage, counts, rate, ETA, failed units, cell letters."""
        now = time.time()
        runs = (
            [self.runs[run_id]]
            if run_id in self.runs
            else ([] if run_id else list(self.runs.values()))
        )
        return {
            "time": now,
            "runs": [
                {
                    "run_id": r.run_id,
                    "run_dir": r.run_dir,
                    "paused": r.paused,
                    "paused_stages": sorted(r.paused_stages),
                    "cancelled": r.cancelled,
                    "rejected": r.rejected,
                    "started": r.started,
                    "stages": [st.summary(now, cells=cells) for st in r.stages.values()],
                }
                for r in runs
            ],
        }

    def unit(self, run_id: str, stage: str, index: int) -> dict[str, Any]:
        """State and details (history included) of one unit."""
        r = self.runs.get(run_id)
        st = r.stages.get(stage) if r is not None else None
        if st is None:
            return {"state": None, "attempts": 0}
        cell = st.cells.get(index)
        return {"state": st.state(index).value, **(cell.as_dict() if cell else {"attempts": 0})}


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


# --------------------------------------------------------------------------- markers


def marker_path(run_dir: Path, stage: str, index: int) -> Path:
    """Done marker of one unit: ``run_dir/done/<stage>/<index>.json``."""
    return Path(run_dir) / MARKERS / stage / f"{index}.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_marker(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write a JSON marker: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's payload, or None when absent or unreadable (then the unit is redone)."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and "result" in payload else None


def done_markers(run_dir: Path, stage: str) -> dict[int, dict[str, Any]]:
    """``{index: marker payload}`` of every unit of ``stage`` durably done (one directory scan)."""
    folder = Path(run_dir) / MARKERS / stage
    out: dict[int, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    for e in entries:
        name = e.name
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            index = int(name[:-5])
        except ValueError:
            continue
        payload = read_marker(Path(e.path))
        if payload is not None:
            out[index] = payload
    return out


# --------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSONL event log of a run folder (written by the driver only).

    Each line is one JSON object with at least ``event`` and ``t`` (epoch s).
    Lines are flushed at once and fsync'd at most every ``sync_s`` seconds and
    on :meth:`close` (the markers, not the journal, are the durable truth).
    """

    def __init__(self, run_dir: Path, *, sync_s: float = 0.5) -> None:
        self.path = Path(run_dir) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        self._sync_s = sync_s
        self._last_sync = 0.0

    def append(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "t": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(rec, separators=(",", ":"), default=str) + "\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self._sync_s:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The journal's records in order; a torn last line (crash mid-write) is ignored."""
    path = Path(run_dir) / JOURNAL
    try:
        fh = open(path)
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def summarize_journal(run_dir: Path) -> dict[str, Any]:
    """Replay the journal into a lattice snapshot (same shape as :meth:`Lattice.snapshot`).

    Used by ``emflow status`` when no run is live. The last session's view is
    shown: units done in earlier sessions count as skipped when the last
    session skipped them, as done otherwise.
    """
    lat = Lattice()
    try:  # the pipeline's run_id is the recipe fingerprint
        run_id = str(json.loads((Path(run_dir) / RUN_JSON).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        run_id = "?"
    sessions = 0
    last_event: dict[str, Any] | None = None
    for rec in read_journal(run_dir):
        ev = rec.get("event")
        last_event = rec
        if ev == "session":
            sessions += 1
            run_id = str(rec.get("run_id") or run_id)
            lat = Lattice()  # a new session starts a fresh lattice
            lat.run(run_id).started = rec["t"]
            continue
        if ev == "stage" and rec.get("run_id") and rec["run_id"] != run_id:
            old_run = lat.runs.pop(run_id, None)
            run_id = str(rec["run_id"])
            if old_run is not None:
                old_run.run_id = run_id
                lat.runs[run_id] = old_run
        r = lat.run(run_id)
        stage, index, t = rec.get("stage"), rec.get("index"), rec.get("t")
        if ev == "stage":
            lat.begin_stage(run_id, stage, int(rec["total"]), run_dir=str(run_dir))
        elif ev == "skipped":
            for i in rec.get("indices", []):
                lat.apply(run_id, stage, int(i), "skip")
        elif ev == "orphaned":
            for i in rec.get("indices", []):
                lat.apply(run_id, stage, int(i), "orphan")
        elif ev == "start":
            lat.apply(run_id, stage, int(index), "start", worker=rec.get("worker"), when=t)
        elif ev == "done":
            cell_start = rec.get("start")
            if lat.run(run_id).stage(stage).state(int(index)) != R and cell_start:
                lat.apply(
                    run_id, stage, int(index), "start", worker=rec.get("worker"), when=cell_start
                )
            lat.apply(
                run_id,
                stage,
                int(index),
                "finish",
                worker=rec.get("worker"),
                when=rec.get("end", t),
            )
        elif ev == "failed":
            st = r.stage(stage)
            if st.state(int(index)) != R:
                lat.apply(run_id, stage, int(index), "start", worker=rec.get("worker"), when=t)
            lat.apply(
                run_id,
                stage,
                int(index),
                "fail",
                worker=rec.get("worker"),
                error=rec.get("error"),
                when=t,
            )
            st.cells[int(index)].attempts = int(rec.get("attempts", st.cells[int(index)].attempts))
        elif ev == "pause":
            r.paused = True
        elif ev == "resume":
            r.paused = False
        elif ev == "cancel":
            r.cancelled = True
    snap = lat.snapshot()
    snap["sessions"] = sessions
    snap["last_event"] = last_event
    return snap


# --------------------------------------------------------------------------- sessions

_SESSIONS: dict[str, str] = {}  # resolved run folder -> journal session id (this process)


def session_id(run_dir: Path) -> str:
    """Journal session of ``run_dir`` in this process (one is started if there is none)."""
    return _SESSIONS.get(str(Path(run_dir).resolve())) or start_session(run_dir)


def start_session(run_dir: Path, *, resumed: bool | None = None) -> str:
    """Begin a journal session: append a ``session`` record, then reconcile the markers.

    Every marker without a ``done`` record in the journal (its unit finished
    after the previous driver stopped writing) gets one (``recovered``), so
    the journal's done units equal the markers. :func:`open_run` calls this.
    """
    run_dir = Path(run_dir)
    sid = uuid.uuid4().hex[:12]
    _SESSIONS[str(run_dir.resolve())] = sid
    journaled: set[tuple[str, int]] = set()
    for rec in read_journal(run_dir):
        if rec.get("event") == "done":
            journaled.add((str(rec.get("stage")), int(rec.get("index", -1))))
    with Journal(run_dir) as j:
        j.append("session", session=sid, resumed=resumed, pid=os.getpid())
        markers = run_dir / MARKERS
        if markers.is_dir():
            for stage_dir in sorted(p for p in markers.iterdir() if p.is_dir()):
                for index, payload in sorted(done_markers(run_dir, stage_dir.name).items()):
                    if (stage_dir.name, index) not in journaled:
                        j.append(
                            "done",
                            session=sid,
                            stage=stage_dir.name,
                            index=index,
                            recovered=True,
                            worker=payload.get("worker"),
                            start=payload.get("start"),
                            end=payload.get("end"),
                        )
    return sid


def journal_done(run_dir: Path) -> set[tuple[str, int]]:
    """``(stage, index)`` of every unit the journal holds as done (any session)."""
    return {
        (str(rec["stage"]), int(rec["index"]))
        for rec in read_journal(run_dir)
        if rec.get("event") == "done" and "stage" in rec and "index" in rec
    }


# --------------------------------------------------------------------------- run folder


def open_run(run_dir: Path, fingerprint: str, *, restart: bool) -> bool:
    """Prepare the run folder; return True when an earlier run of the same recipe is resumed.

    With ``restart`` every marker, the journal and the live-run file are
    removed first, so nothing is skipped.

    Raises
    ------
    OutputError
        The folder holds a run of a recipe with another fingerprint (output
        would differ) and ``restart`` is False.
    """
    run_dir = Path(run_dir)
    run_json = run_dir / RUN_JSON
    if run_json.exists() and not restart:
        try:
            old = json.loads(run_json.read_text()).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            raise OutputError(
                f"{run_dir} holds a run of a different recipe "
                f"(fingerprint {old} != {fingerprint}), "
                "so it cannot be resumed; use --restart to redo everything, "
                "or choose another output_dir"
            )
        start_session(run_dir, resumed=True)
        return True
    if restart:
        for name in (MARKERS,):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in (JOURNAL, SCHEDULER_JSON, RUN_JSON):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_json, {"fingerprint": fingerprint, "created": time.time(), "result": None})
    except OSError as exc:
        raise OutputError(
            f"cannot write the run folder {run_dir} ({exc}); check permissions"
        ) from exc
    start_session(run_dir, resumed=False)
    return False


def write_scheduler_file(
    run_dir: Path, *, address: str, dashboard: str | None, run_id: str
) -> None:
    """Record the live run's scheduler so ``emflow status/pause/resume/cancel`` can reach it."""
    write_marker(
        Path(run_dir) / SCHEDULER_JSON,
        {
            "address": address,
            "dashboard": dashboard,
            "run_id": run_id,
            "pid": os.getpid(),
            "started": time.time(),
            "result": None,
        },
    )


def read_scheduler_file(run_dir: Path) -> dict[str, Any] | None:
    """The live-run record written by :func:`write_scheduler_file`, if any."""
    return read_marker(Path(run_dir) / SCHEDULER_JSON)
