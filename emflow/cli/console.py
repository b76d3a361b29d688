"""Keep the terminal for emflow's own lines: library and worker output goes to a log file.

While :func:`libraries_to_log` is active, file descriptor 2 (what C libraries,
Dask's loggers and local worker processes write to) points at a log file in the
run folder, and ``sys.stderr`` is a new stream on the terminal, so emflow's
messages and progress bars still reach the user. Python warnings, uncaught
exceptions of background threads and "exception ignored" reports go to the log
too; the warnings users should know about become one emflow line each
(:data:`TRANSLATIONS`, e.g. a dashboard port already in use).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

#: warning text → emflow's one line for it (None: the log only)
TRANSLATIONS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (  # emflow's own security warning (emflow.cluster): the user chose it, so say it plainly
        re.compile(r"^--insecure: .*"),
        lambda m: f"emflow: warning: {m.group(0)}",
    ),
    (
        re.compile(r"Port (\d+) is already in use"),
        lambda m: (
            f"dashboard port {m.group(1)} is in use (another Dask?); a free port is used "
            "instead (its link follows)"
        ),
    ),
)


class _Notices:
    """emflow lines derived from library warnings, shown once each."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seen: set[str] = set()

    def __call__(self, text: str) -> None:
        for pattern, make in TRANSLATIONS:
            m = pattern.search(text)
            if m is not None:
                line = make(m)
                if line not in self.seen:
                    self.seen.add(line)
                    self.say(line)


@contextlib.contextmanager
def libraries_to_log(log_path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Route fd 2, warnings, thread and unraisable exceptions to ``log_path`` while active."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    notices = _Notices(say)
    with contextlib.suppress(ImportError):  # Dask binds its log handlers to sys.stderr on import:
        import distributed  # noqa: F401  bind them to fd 2 (the log), not to the terminal stream
    sys.stderr.flush()
    saved_fd = os.dup(2)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} emflow pid {os.getpid()}\n")
    os.dup2(log.fileno(), 2)
    terminal = io.TextIOWrapper(
        os.fdopen(os.dup(saved_fd), "wb", buffering=0),
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="replace",
        line_buffering=True,
        write_through=True,
    )
    old = (
        sys.stderr,
        warnings.showwarning,
        threading.excepthook,
        sys.unraisablehook,
        logging.lastResort,
    )

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        log.write(text)
        notices(str(message))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        log.write(f"exception in thread {name}:\n")
        log.write(
            "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        )

    def unraisable(args) -> None:
        log.write(
            f"exception ignored in {args.object!r}: {args.exc_type.__name__}: {args.exc_value}\n"
        )

    sys.stderr = terminal
    warnings.showwarning = show
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable
    logging.lastResort = logging.StreamHandler(log)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            terminal.flush()
        (sys.stderr, warnings.showwarning, threading.excepthook, sys.unraisablehook) = old[:4]
        logging.lastResort = old[4]
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        # ``terminal`` stays open: a handler made meanwhile may still hold it; ``log`` stays open
        # for stragglers (a worker thread finishing), the OS closes both at exit
