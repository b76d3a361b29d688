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
import select
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """emflow lines derived from library warnings, shown once each; held until a ``say``
    exists (a warning of a cluster that starts while the run is still checked)."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.say = say
        self.seen: set[str] = set()
        self.held: list[str] = []

    def attach(self, say: Callable[[str], None]) -> None:
        self.say = say
        held, self.held = self.held, []
        for line in held:
            say(line)

    def __call__(self, text: str) -> None:
        for pattern, make in TRANSLATIONS:
            m = pattern.search(text)
            if m is not None:
                line = make(m)
                if line not in self.seen:
                    self.seen.add(line)
                    if self.say is None:
                        self.held.append(line)
                    else:
                        self.say(line)


class _Route:
    """fd 2 onto ``fd``, ``sys.stderr`` a new stream on the terminal, Python's warnings, thread
    and unraisable exceptions written with ``write`` (text); :meth:`restore` undoes it."""

    def __init__(
        self,
        fd: int,
        write: Callable[[str], object],
        notices: _Notices,
        redirected: Callable[[], object] | None = None,
    ) -> None:
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(fd, 2)
        try:
            if redirected is not None:
                redirected()  # e.g. start a process whose fd 2 must be the pipe
            with contextlib.suppress(ImportError):  # Dask binds its log handlers to sys.stderr
                import distributed  # noqa: F401  on import: to this stream, whose fd 2 is the pipe
        except BaseException:
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            raise
        terminal = io.TextIOWrapper(
            os.fdopen(os.dup(self._saved_fd), "wb", buffering=0),
            encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="replace",
            line_buffering=True,
            write_through=True,
        )
        self._old = (
            sys.stderr,
            warnings.showwarning,
            threading.excepthook,
            sys.unraisablehook,
            logging.lastResort,
        )

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            write(warnings.formatwarning(message, category, filename, lineno, line))
            notices(str(message))

        def thread_hook(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread else "?"
            write(
                f"exception in thread {name}:\n"
                + "".join(
                    traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
                )
            )

        def unraisable(args) -> None:
            write(
                f"exception ignored in {args.object!r}: {args.exc_type.__name__}: "
                f"{args.exc_value}\n"
            )

        class _Stream:  # logging.lastResort's stream
            def write(self, text: str) -> None:
                write(text)

            def flush(self) -> None:
                pass

        self.terminal = terminal
        sys.stderr = terminal
        warnings.showwarning = show
        threading.excepthook = thread_hook
        sys.unraisablehook = unraisable
        logging.lastResort = logging.StreamHandler(_Stream())
        self.restored = False

    def restore(self) -> None:
        if self.restored:
            return
        self.restored = True
        with contextlib.suppress(Exception):
            self.terminal.flush()
        (sys.stderr, warnings.showwarning, threading.excepthook, sys.unraisablehook) = self._old[:4]
        logging.lastResort = self._old[4]
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        # the terminal stream stays open: a handler made meanwhile may still hold it


class HeldOutput:
    """Library output routed away from the terminal before the run's log file may be written.

    ``emflow run`` starts its local cluster while the run is still being checked, and nothing
    may be written in the run folder before the checks passed; the worker processes inherit
    fd 2 when they are spawned. So fd 2 becomes a pipe, which a thread reads: it holds what
    arrives (up to :data:`HELD_BYTES`) until :func:`libraries_to_log` attaches the log file,
    then writes there. :meth:`discard` (the run was refused) drops what was held and gives the
    terminal back. The workers keep the pipe as their stderr for the whole run, so their output
    reaches the log through this thread (lost with the driver if it is killed).
    """

    #: at most this much output is held before the log file is known; the rest is dropped
    HELD_BYTES = 4 << 20

    def __init__(
        self, redirected: Callable[[], object] | None = None, *, routed: bool = True
    ) -> None:
        """``redirected``: called once fd 2 is the pipe, before Dask is imported. ``routed=False``:
        only the pipe and its reader for now (:meth:`spawn` starts processes on it), fd 2 and
        ``sys.stderr`` are routed later by :meth:`route_now`."""
        self._lock = threading.Lock()
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._dropped_bytes = 0  # beyond HELD_BYTES before the log was attached
        self._file: Any = None  # the log, once attached
        self._dropping = False
        self._read_fd, self._write_fd = os.pipe()
        self._idle = threading.Event()
        self._idle.set()
        self.notices = _Notices()
        self.route: _Route | None = None
        if routed:
            self.route_now(redirected)
        self._reader = threading.Thread(target=self._pump, name="emflow-library-output", daemon=True)
        self._reader.start()

    def spawn(self, start: Callable[[], object]) -> None:
        """Call ``start`` with fd 2 on the pipe: the processes it starts write there (the local
        cluster's fork server, and the workers it forks, for the whole run); fd 2 is the
        terminal again afterwards, until :meth:`route_now`."""
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(self._write_fd, 2)
            start()
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def route_now(self, redirected: Callable[[], object] | None = None) -> None:
        """Route fd 2, ``sys.stderr``, warnings and thread errors to the pipe (:class:`_Route`)."""
        try:
            self.route = _Route(self._write_fd, self._write_text, self.notices, redirected)
        finally:
            os.close(self._write_fd)  # fd 2 (and the processes spawned meanwhile) hold the pipe
            self._write_fd = -1

    def _pump(self) -> None:
        """Read the pipe until every writer closed it; busy (``_idle`` clear) from the moment
        data is there until it is written, so :meth:`settle` never sees it in neither place."""
        try:
            while True:
                select.select([self._read_fd], [], [])
                self._idle.clear()
                data = os.read(self._read_fd, 1 << 16)
                if not data:
                    return
                self._write_bytes(data)
                self._idle.set()
        except OSError:
            return
        finally:
            self._idle.set()
            os.close(self._read_fd)

    def _write_bytes(self, data: bytes) -> None:
        with self._lock:
            if self._dropping:
                return
            if self._file is None:
                if self._held_bytes < self.HELD_BYTES:
                    self._held.append(data)
                    self._held_bytes += len(data)
                else:
                    self._dropped_bytes += len(data)
                return
            with contextlib.suppress(Exception):  # a full disk must not end the run
                _write_raw(self._file, data)

    def _write_text(self, text: str) -> None:
        self._write_bytes(text.encode("utf-8", "replace"))

    def attach(self, log: Any, say: Callable[[str], None]) -> None:
        """From now on write into ``log`` (a text file open for appending): what was held
        first; notices held meanwhile are said now."""
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
            self._file = log
            if self._dropped_bytes:
                note = f"[emflow: {self._dropped_bytes} bytes of early output dropped]\n"
                held.append(note.encode())
            for data in held:
                with contextlib.suppress(Exception):
                    _write_raw(log, data)
        self.notices.attach(say)

    def settle(self, timeout: float = 1.0) -> None:
        """Wait (up to ``timeout`` s) until what the pipe holds has been written out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._reader.is_alive():
            if self._idle.is_set() and _pending(self._read_fd) == 0:
                return
            time.sleep(0.005)

    def discard(self) -> None:
        """Give the terminal back; if no log was attached, drop what was held and what still
        arrives (the run was refused: its cluster's output is nobody's business)."""
        with self._lock:
            if self._file is None:
                self._dropping = True
                self._held.clear()
        if self.route is not None:
            self.route.restore()
        elif self._write_fd >= 0:  # never routed: the processes spawned on the pipe hold it
            os.close(self._write_fd)
            self._write_fd = -1


def _write_raw(log: Any, data: bytes) -> None:
    log.flush()
    os.write(log.fileno(), data)


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` (FIONREAD); 0 where it cannot be asked."""
    try:
        import fcntl
        import struct
        import termios

        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ImportError):
        return 0


@contextlib.contextmanager
def libraries_to_log(
    log_path: Path, say: Callable[[str], None], held: HeldOutput | None = None
) -> Iterator[None]:
    """Route fd 2, warnings, thread and unraisable exceptions to ``log_path`` while active.

    ``held``: the routing already made before the log could be written (:class:`HeldOutput`):
    what it held goes into the log first, and it writes there from now on.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} emflow pid {os.getpid()}\n")
    if held is None:
        route = _Route(log.fileno(), log.write, _Notices(say))
    else:
        if held.route is None:
            held.route_now()
        assert held.route is not None
        route = held.route
        held.attach(log, say)
    try:
        yield
    finally:
        route.restore()
        if held is not None:
            held.settle()
        # ``log`` stays open for stragglers (a worker thread finishing); the OS closes it at exit
