"""How a run's progress is shown: a table in Jupyter, a bar on a terminal, log lines elsewhere.

:class:`emflow.lattice.execute.Progress` counts a stage's units; it hands each update to
the display chosen here (:func:`display_for`):

``"html"``  in a Jupyter kernel: one table per run (stage, bar, units done/total, MB/s,
            elapsed, ETA), updated in place through IPython's display handles. The last
            state stays in the saved notebook (no widget JavaScript needed to see it).
``"tqdm"``  ``tqdm.auto`` bars (ipywidgets in Jupyter), when asked for with
            ``EMFLOW_PROGRESS=tqdm`` and tqdm is installed (``pip install emflow[notebook]``).
``"text"``  a one-line ``\\r`` bar per stage on a terminal (``sys.stderr`` is a tty).
``"log"``   no terminal: one log line (logger ``emflow.progress``) when a stage ends, and one
            every :data:`LOG_EVERY_S` seconds while it runs, with units done and the ETA.

Every stage's end is also logged at INFO (so ``run.log`` lists stages, units and times);
the console handler of :mod:`emflow.logs` skips that line when a bar already showed it.
``EMFLOW_PROGRESS`` = ``html | tqdm | text | log | off`` overrides the choice.
"""

from __future__ import annotations

import html
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

logger = logging.getLogger("emflow.progress")

#: seconds between two progress log lines of a running stage (``"log"`` display)
LOG_EVERY_S = 30.0
#: seconds between two redraws of a bar or table
REDRAW_S = 0.2
STYLES = ("html", "tqdm", "text", "log", "off")


class StageCounts(Protocol):
    """What a display reads from :class:`emflow.lattice.execute.Progress`."""

    stage: str
    total: int
    done: int
    nbytes: int
    start: float


class Display(Protocol):
    def update(self, p: StageCounts, now: float) -> None: ...


def in_jupyter() -> bool:
    """True inside a Jupyter (IPython kernel) session."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def choose_style(stream: TextIO, enabled: bool | None) -> str:
    """The display style for a stage: see the module docstring."""
    if enabled is False:
        return "off"
    forced = os.environ.get("EMFLOW_PROGRESS", "").strip().lower()
    if forced in STYLES:
        if forced == "tqdm" and not _has_tqdm():
            return "html" if in_jupyter() else "text"
        return forced
    if in_jupyter():
        return "html"
    if enabled or _isatty(stream):
        return "text"
    return "log"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _has_tqdm() -> bool:
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# figures shared by every display
# ---------------------------------------------------------------------------------------
def rate_mb_s(p: StageCounts, now: float) -> float | None:
    elapsed = now - p.start
    return p.nbytes / 1e6 / elapsed if p.nbytes and elapsed > 0 else None


def eta_s(p: StageCounts, now: float) -> float | None:
    """Seconds left at the stage's mean pace so far (None before the first unit or at the end)."""
    elapsed = now - p.start
    ran = p.done - getattr(p, "reused", 0)  # units an earlier run finished took no time here
    if 0 < ran and p.done < p.total and elapsed > 0:
        return elapsed / ran * (p.total - p.done)
    return None


def format_s(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def stage_line(p: StageCounts, now: float) -> str:
    """``features: 20/37 units, 12 s, 3.1 MB/s, ETA 10 s`` (``done`` instead of the ETA at the end)."""
    parts = [f"{p.stage}: {p.done}/{p.total} units", format_s(now - p.start)]
    rate = rate_mb_s(p, now)
    if rate is not None:
        parts.append(f"{rate:.1f} MB/s")
    eta = eta_s(p, now)
    if eta is not None:
        parts.append(f"ETA {format_s(eta)}")
    elif p.done >= p.total:
        parts.append("done")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# displays
# ---------------------------------------------------------------------------------------
class TextBar:
    """``\\r`` bar on a terminal, one line per stage."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def update(self, p: StageCounts, now: float) -> None:
        width = 30
        frac = p.done / max(1, p.total)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = rate_mb_s(p, now)
        eta = eta_s(p, now)
        text = f"\r{p.stage:>10} [{bar}] {p.done}/{p.total}"
        text += f"  {rate:6.1f} MB/s" if rate is not None else ""
        text += f"  eta {format_s(eta):>9}" if eta is not None else ""
        text += "\n" if p.done >= p.total else ""
        self.stream.write(text)
        self.stream.flush()


class LogLines:
    """A log line every :data:`LOG_EVERY_S` s while a stage runs (the end line is logged anyway)."""

    def __init__(self) -> None:
        self.next = time.perf_counter() + LOG_EVERY_S

    def update(self, p: StageCounts, now: float) -> None:
        if p.done < p.total and now >= self.next:
            self.next = now + LOG_EVERY_S
            logger.info(stage_line(p, now))


class TqdmBar:
    """``tqdm.auto`` (a widget in Jupyter when ipywidgets is installed)."""

    def __init__(self, p: StageCounts) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=p.total, desc=p.stage, unit="unit", mininterval=REDRAW_S)

    def update(self, p: StageCounts, now: float) -> None:
        self.bar.update(p.done - self.bar.n)
        if p.done >= p.total:
            self.bar.close()


class Board:
    """One HTML table for all stages of a run, redrawn in place in Jupyter."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[StageCounts, float]] = {}
        self.handle: Any = None

    def update(self, p: StageCounts, now: float) -> None:
        self.rows[p.stage] = (p, now)
        from IPython.display import HTML, display

        page = HTML(self.html())
        if self.handle is None:
            self.handle = display(page, display_id=True)
        else:
            self.handle.update(page)

    def text(self) -> str:
        return "\n".join(stage_line(p, now) for p, now in self.rows.values())

    def html(self) -> str:
        rows = []
        for p, now in self.rows.values():
            rate = rate_mb_s(p, now)
            eta = eta_s(p, now)
            state = "done" if p.done >= p.total else (f"ETA {format_s(eta)}" if eta else "…")
            rows.append(
                "<tr>"
                f"<td style='text-align:left'><b>{html.escape(p.stage)}</b></td>"
                f"<td><progress value='{p.done}' max='{max(1, p.total)}' "
                "style='width:14em'></progress></td>"
                f"<td>{p.done}/{p.total}</td>"
                f"<td>{format_s(now - p.start)}</td>"
                f"<td>{'' if rate is None else f'{rate:.1f} MB/s'}</td>"
                f"<td>{state}</td></tr>"
            )
        head = "".join(
            f"<th>{h}</th>" for h in ("stage", "", "units", "elapsed", "read", "remaining")
        )
        return (
            "<table class='emflow-progress'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )


@dataclass
class _Run:
    board: Board | None
    on_stage: Callable[[], None] | None


_RUN: _Run | None = None


@contextmanager
def run_board(on_stage: Callable[[], None] | None = None) -> Iterator[Board | None]:
    """While active (one run), Jupyter stage displays share one table, and ``on_stage`` is
    called when each stage starts (the run folder exists by then: :class:`emflow.logs.RunLog`
    starts writing)."""
    global _RUN
    outer = _RUN
    _RUN = _Run(Board() if in_jupyter() else None, on_stage)
    try:
        yield _RUN.board
    finally:
        _RUN = outer


def display_for(p: StageCounts, stream: TextIO, enabled: bool | None) -> Display | None:
    """The display for one stage (None: nothing shown but the log)."""
    if _RUN is not None and _RUN.on_stage is not None:
        _RUN.on_stage()
    style = choose_style(stream, enabled)
    if style == "html":
        return _RUN.board if _RUN is not None and _RUN.board is not None else Board()
    if style == "tqdm":
        return TqdmBar(p)
    if style == "text":
        return TextBar(stream)
    if style == "log":
        return LogLines()
    return None


def stage_finished(p: StageCounts, now: float, shown: bool) -> None:
    """Log a finished stage (``run.log`` and, when no bar showed it, the console)."""
    logger.info(stage_line(p, now), extra={"emflow_shown": shown})
