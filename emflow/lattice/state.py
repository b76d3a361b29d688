"""The unit state machine and the in-memory stage x unit lattice (pure bookkeeping, no Dask).

:class:`UnitState` and the named :data:`TRANSITIONS`; :class:`Lattice` holds a
:class:`RunLattice` per run, a :class:`StageLattice` per stage (one state letter per
unit, a :class:`Cell` of details per touched unit, optional per-unit labels such as
``z 0-63``) and aggregates per stage counts, redo counts, rate, ETA and failed units
in :meth:`Lattice.snapshot`. Time spent paused does not count towards a stage's rate,
so its ETA stays put while the run is paused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

HISTORY_MAX = 16  # per-unit history entries kept in memory
LABELS_MAX = 200_000  # per-stage unit labels kept (beyond: none, the page shows indices)


class UnitState(str, Enum):
    """State of one unit of one stage (in display order)."""

    WAITING = "waiting"  # not handed to a worker (or handed back: paused, worker lost)
    QUEUED = "queued"  # assigned to a worker by the scheduler, not started there yet
    RUNNING = "running"  # started on a worker (it passed the pause/cancel gate)
    DONE = "done"  # done at the first attempt
    REDONE = "redone"  # done after an earlier attempt failed or was lost with its worker
    FAILED = "failed"
    SKIPPED = "skipped"  # done by an earlier run: its marker exists
    ORPHANED = "orphaned"  # not run because an upstream unit failed

    @property
    def code(self) -> str:
        """One letter, used in the compact per-stage cell strings of the JSON snapshot."""
        return _CODE[self]


_CODE = {
    UnitState.WAITING: "w",
    UnitState.QUEUED: "q",
    UnitState.RUNNING: "r",
    UnitState.DONE: "d",
    UnitState.REDONE: "e",
    UnitState.FAILED: "f",
    UnitState.SKIPPED: "s",
    UnitState.ORPHANED: "o",
}
_FROM_CODE = {v: k for k, v in _CODE.items()}

W, Q, R, D, E, F, S, O = (  # noqa: E741
    UnitState.WAITING,
    UnitState.QUEUED,
    UnitState.RUNNING,
    UnitState.DONE,
    UnitState.REDONE,
    UnitState.FAILED,
    UnitState.SKIPPED,
    UnitState.ORPHANED,
)
#: named transitions: name -> (allowed source states, target state). ``finish`` lands in
#: REDONE instead of DONE when the unit had an earlier attempt (failed or lost).
TRANSITIONS: dict[str, tuple[frozenset[UnitState], UnitState]] = {
    "queue": (frozenset({W, F}), Q),
    "start": (frozenset({W, Q, F}), R),
    "finish": (frozenset({R, Q, W, F}), D),  # Q/W/F: a result may overtake its 'start' report
    "fail": (frozenset({R, Q, W}), F),
    "requeue": (frozenset({Q, R}), W),  # worker lost, refused while paused, cancelled
    "skip": (frozenset({W}), S),
    "orphan": (frozenset({W, F}), O),
}
FINISHED = frozenset({D, E, S})


class Cell:
    """Details of one unit that left ``waiting``: attempts, losses, worker, timings, history.

    ``attempts`` counts starts (on a worker, or in the driver); ``lost`` counts attempts
    lost with their worker or with a driver that stopped.
    """

    __slots__ = ("attempts", "end", "error", "history", "lost", "start", "worker")

    def __init__(self) -> None:
        self.attempts = 0
        self.lost = 0
        self.worker: str | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.error: str | None = None
        self.history: list[tuple[float, str, str | None, str | None]] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "lost": self.lost,
            "worker": self.worker,
            "start": self.start,
            "end": self.end,
            "error": self.error,
            "history": [list(h) for h in self.history],
        }


class StageLattice:
    """The units of one stage: a byte per unit (state letter) plus details of touched units.

    ``planned`` is True while the stage is only announced (its total may still change
    when it begins, e.g. slabs once the alignment fixed the output frame).
    """

    def __init__(
        self, name: str, total: int = 0, labels: Sequence[str] | None = None, planned=False
    ) -> None:
        self.name = name
        self.codes = bytearray(b"w" * total)
        self.cells: dict[int, Cell] = {}
        self.labels = list(labels) if labels and len(labels) <= LABELS_MAX else None
        self.planned = planned
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.finished_here = 0  # done in this session (not skipped), for the rate
        self.lost = 0  # attempts lost with their worker (or an earlier driver)

    @property
    def total(self) -> int:
        return len(self.codes)

    def grow(self, total: int) -> None:
        if total > len(self.codes):
            self.codes.extend(b"w" * (total - len(self.codes)))

    def state(self, index: int) -> UnitState:
        return _FROM_CODE[chr(self.codes[index])] if index < len(self.codes) else W

    def cell(self, index: int) -> Cell:
        c = self.cells.get(index)
        if c is None:
            c = self.cells[index] = Cell()
        return c

    def counts(self) -> dict[str, int]:
        return {s.value: self.codes.count(s.code.encode()) for s in UnitState}

    def summary(self, now: float, *, cells: bool, paused_s=None) -> dict[str, Any]:
        """Counts, redo counts, rate and ETA (pause time excluded), failed units, cells."""
        counts = self.counts()
        left = counts["waiting"] + counts["queued"] + counts["running"]
        t0 = self.first_start
        t1 = (self.last_end if not left else None) or now
        elapsed = (t1 - t0) if t0 is not None else 0.0
        if paused_s is not None and t0 is not None:
            elapsed -= paused_s(t0, t1)
        rate = self.finished_here / elapsed if elapsed > 0 and self.finished_here else 0.0
        failed = [
            {"index": i, **{k: v for k, v in self.cells[i].as_dict().items() if k != "history"}}
            for i in sorted(self.cells)
            if chr(self.codes[i]) == "f"
        ]
        out: dict[str, Any] = {
            "stage": self.name,
            "total": self.total,
            "planned": self.planned,
            "counts": counts,
            "lost": self.lost,
            "elapsed_s": round(max(0.0, elapsed), 3),
            "rate_per_s": round(rate, 3),
            "eta_s": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None),
            "failed": failed,
        }
        if cells:
            out["cells"] = self.codes.decode()
            if self.labels is not None:
                out["labels"] = self.labels
        return out


class RunLattice:
    """All stages of one run (one ``run_id``) plus its pause/cancel switches.

    ``hold`` maps a stage to the number of its units still allowed to start before the
    stage pauses itself (``emflow_pause(after=N)``; reproducing an interruption).
    ``pauses`` holds ``[stage or None, since, until or None]`` intervals for the ETA.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.stages: dict[str, StageLattice] = {}
        self.paused = False
        self.paused_stages: set[str] = set()
        self.hold: dict[str, int] = {}
        self.cancelled = False
        self.run_dir: str | None = None
        self.session: str | None = None  # driver session; a new one clears pause/cancel
        self.started = time.time()
        self.rejected = 0  # late duplicates / illegal transitions refused
        self.pauses: list[list[Any]] = []

    def stage(self, name: str) -> StageLattice:
        st = self.stages.get(name)
        if st is None:
            st = self.stages[name] = StageLattice(name)
        return st

    def is_paused(self, stage: str | None) -> bool:
        return self.paused or (stage is not None and stage in self.paused_stages)

    def set_paused(self, on: bool, stage: str | None = None, now: float | None = None) -> None:
        """Switch the pause of the run (``stage=None``) or of one stage, noting the interval."""
        now = time.time() if now is None else now
        if stage is None:
            was, self.paused = self.paused, on
            if not on:
                for s in list(self.paused_stages):
                    self.set_paused(False, s, now)
                self.hold.clear()
        else:
            was = stage in self.paused_stages
            (self.paused_stages.add if on else self.paused_stages.discard)(stage)
            if not on:
                self.hold.pop(stage, None)
        if on and not was:
            self.pauses.append([stage, now, None])
        elif was and not on:
            for p in self.pauses:
                if p[0] == stage and p[2] is None:
                    p[2] = now

    def paused_seconds(self, stage: str, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] during which the run or ``stage`` was paused (overlaps merged)."""
        spans = sorted(
            (max(t0, a), min(t1, b if b is not None else t1))
            for s, a, b in self.pauses
            if s is None or s == stage
        )
        total, end = 0.0, t0
        for a, b in spans:
            a = max(a, end)
            if b > a:
                total += b - a
                end = b
        return total


class Lattice:
    """The stage x unit lattice of every run a scheduler (or a serial driver) knows.

    Pure bookkeeping, no Dask: :class:`LatticePlugin` feeds it from scheduler
    transitions and from the units' start gate; tests drive it directly.
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

    def _session(self, r: RunLattice, session: str | None) -> None:
        """A new driver ``session`` of a known run (``emflow run`` again) clears pause/cancel."""
        if session and session != r.session:
            if r.session is not None:
                r.set_paused(False)
                r.cancelled = False
            r.session = session

    def plan(
        self,
        run_id: str,
        stages: Sequence[dict[str, Any]],
        *,
        run_dir: str | None = None,
        session: str | None = None,
    ) -> None:
        """Announce the stages of a run before they begin: ``[{"stage", "total", "labels"?}]``.

        Stages already begun keep their state; planned ones are (re)placed in run order.
        """
        r = self.run(run_id)
        if run_dir:
            r.run_dir = run_dir
        self._session(r, session)
        old = r.stages
        r.stages = {}
        for s in stages:
            name = str(s["stage"])
            prev = old.pop(name, None)
            if prev is not None and not prev.planned:
                r.stages[name] = prev
            else:
                r.stages[name] = StageLattice(name, int(s["total"]), s.get("labels"), planned=True)
        r.stages.update(old)  # stages begun outside the plan stay, after it

    def begin_stage(
        self,
        run_id: str,
        stage: str,
        total: int,
        *,
        skipped: Iterable[int] = (),
        orphaned: Iterable[int] = (),
        redo: Iterable[int] = (),
        labels: Sequence[str] | None = None,
        run_dir: str | None = None,
        session: str | None = None,
    ) -> None:
        """Declare (or restart) a stage of ``total`` units, some already done (skipped) or orphaned.

        ``redo`` are units an earlier driver started but did not finish (lost with it):
        they count one lost attempt, and finish as *redone*.
        """
        r = self.run(run_id)
        if run_dir:
            r.run_dir = run_dir
        self._session(r, session)
        prev = r.stages.get(stage)
        if labels is None and prev is not None and prev.total == total:
            labels = prev.labels
        # a stage begun again starts afresh; a planned one keeps its place in run order
        r.stages[stage] = StageLattice(stage, total, labels)
        for i in skipped:
            self.apply(run_id, stage, i, "skip")
        for i in orphaned:
            self.apply(run_id, stage, i, "orphan")
        for i in redo:
            self.lose(run_id, stage, i, worker=None, reason="driver stopped")

    def lose(
        self,
        run_id: str,
        stage: str,
        index: int,
        *,
        worker: str | None,
        reason: str = "worker lost",
        when: float | None = None,
    ) -> None:
        """Record an attempt lost with its worker: a running unit goes back to waiting."""
        st = self.run(run_id).stage(stage)
        st.grow(index + 1)
        now = time.time() if when is None else when
        cell = st.cell(index)
        cell.lost += 1
        st.lost += 1
        if st.state(index) in (Q, R):
            st.codes[index] = ord(W.code)
        cell.history.append((round(now, 3), "lost", worker or cell.worker, reason))
        del cell.history[:-HISTORY_MAX]

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
        if transition in ("skip", "orphan"):
            st.codes[index] = ord(target.code)
            return True
        cell = st.cell(index)
        if transition == "queue":
            cell.worker = worker
        elif transition == "start":
            cell.attempts += 1
            cell.start, cell.end, cell.worker = now, None, worker or cell.worker
            if st.first_start is None:
                st.first_start = now
        elif transition in ("finish", "fail"):
            cell.end = now
            cell.worker = worker or cell.worker
            if transition == "finish":
                cell.error = None
                cell.attempts = max(cell.attempts, 1)
                if cell.attempts > 1 or cell.lost:
                    target = E
                st.finished_here += 1
                st.last_end = now
                if st.first_start is None:
                    st.first_start = cell.start or now
            else:
                cell.error = error
        st.codes[index] = ord(target.code)
        cell.history.append((round(now, 3), target.value, worker or cell.worker, error))
        del cell.history[:-HISTORY_MAX]
        return True

    def snapshot(
        self, run_id: str | None = None, *, cells: bool = True, now: float | None = None
    ) -> dict[str, Any]:
        """JSON-ready view: per run and stage, counts, rate, ETA, failed units, cell letters.

        ``now``: the time the view is for (a stopped run's last journal record).
        """
        now = time.time() if now is None else now
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
                    "stages": [
                        st.summary(
                            now,
                            cells=cells,
                            paused_s=lambda a, b, _n=st.name, _r=r: _r.paused_seconds(_n, a, b),
                        )
                        for st in r.stages.values()
                    ],
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
        label = st.labels[index] if st.labels and index < len(st.labels) else None
        return {
            "state": st.state(index).value,
            "label": label,
            **(cell.as_dict() if cell else {"attempts": 0, "lost": 0}),
        }
