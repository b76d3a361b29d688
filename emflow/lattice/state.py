"""The unit state machine and the in-memory stage x unit lattice (pure bookkeeping, no Dask).

:class:`UnitState` and the named :data:`TRANSITIONS`; :class:`Lattice` holds a
:class:`RunLattice` per run, a :class:`StageLattice` per stage (one state letter per
unit, a :class:`Cell` of details per touched unit) and aggregates per stage counts,
rate, ETA and failed units in :meth:`Lattice.snapshot`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import Enum
from typing import Any

HISTORY_MAX = 16  # per-unit history entries kept in memory


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
