"""Run the units of one stage: serially in-process, or on Dask in a bounded window.

A *unit* is one small, idempotent, serialisable call (one slice, pair or slab)
that writes its own output and returns a small dict. Units of a stage are
independent; stages run one after another. On Dask, at most ``window`` units are
in flight at once (a few per worker thread), so the scheduler never holds the
whole run; task keys are ``("emflow-<stage>-<run_id>", index)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(*args)`` for item ``index`` of a stage."""

    index: int
    fn: Callable[..., Any]
    args: tuple = ()
    nbytes: int = 0  # input bytes, for the progress rate


@dataclass
class Progress:
    """A one-line terminal progress bar per stage (silent when not a terminal)."""

    stage: str
    total: int
    stream: TextIO | None = None
    enabled: bool | None = None
    done: int = 0
    nbytes: int = 0
    start: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def __post_init__(self) -> None:
        if self.stream is None:
            self.stream = sys.stderr
        if self.enabled is None:
            self.enabled = self.stream.isatty()

    def advance(self, nbytes: int = 0) -> None:
        self.done += 1
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        frac = self.done / max(1, self.total)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = now - self.start
        rate = f"  {self.nbytes / 1e6 / elapsed:6.1f} MB/s" if self.nbytes and elapsed > 0 else ""
        eta = ""
        if 0 < self.done < self.total and elapsed > 0:
            eta = f"  eta {elapsed / self.done * (self.total - self.done):5.0f} s"
        end = "\n" if self.done == self.total else ""
        assert self.stream is not None
        self.stream.write(f"\r{self.stage:>10} [{bar}] {self.done}/{self.total}{rate}{eta}{end}")
        self.stream.flush()


def unit_key(stage: str, run_id: str, index: int) -> tuple[str, int]:
    """The Dask key of a unit: the lattice plugin reads stage and index from it."""
    return (f"emflow-{stage}-{run_id}", index)


def run_stage(
    stage: str,
    units: Sequence[Unit],
    *,
    client: Any = None,
    run_id: str = "run",
    window: int | None = None,
    retries: int = 0,
    progress: Progress | None = None,
    on_result: Callable[[Unit, Any], None] | None = None,
) -> dict[int, Any]:
    """Run every unit of a stage and return ``{index: result}``.

    With ``client=None`` units run here, in order (notebooks, pdb). With a Dask
    client they are submitted in a window of ``window`` units; a unit that still
    fails after ``retries`` retries stops the stage and its exception is raised.
    """
    results: dict[int, Any] = {}
    progress = progress or Progress(stage, len(units), enabled=False)
    if client is None:
        for unit in units:
            res = unit.fn(*unit.args)
            results[unit.index] = res
            if on_result is not None:
                on_result(unit, res)
            progress.advance(unit.nbytes)
        return results

    from distributed import as_completed

    if window is None:
        threads = sum(client.nthreads().values()) or 1
        window = max(2, 2 * threads)
    pending = list(reversed(units))
    by_key: dict[Any, Unit] = {}

    def submit_one() -> Any:
        unit = pending.pop()
        key = unit_key(stage, run_id, unit.index)
        fut = client.submit(unit.fn, *unit.args, key=key, retries=retries, pure=False)
        by_key[fut.key] = unit
        return fut

    ac = as_completed([submit_one() for _ in range(min(window, len(pending)))], with_results=False)
    for fut in ac:
        unit = by_key.pop(fut.key)
        if fut.status == "error":
            exc = fut.exception()
            for other in list(ac.futures):
                other.cancel()
            raise exc
        res = fut.result()
        fut.release()
        results[unit.index] = res
        if on_result is not None:
            on_result(unit, res)
        progress.advance(unit.nbytes)
        if pending:
            ac.add(submit_one())
    return results
