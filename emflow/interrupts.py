"""Ctrl-C that is never lost during a run.

A SIGINT that lands while Python runs a garbage-collector callback or a ``__del__``
(distributed registers one) raises KeyboardInterrupt *inside* that callback, where Python
prints "Exception ignored" and drops it: the run would go on as if nothing was pressed.
While a run is active, SIGINT is also remembered here, and the run's loops call
:func:`check`, which raises KeyboardInterrupt again until it is delivered.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_requested = threading.Event()


@contextmanager
def remembered() -> Iterator[None]:
    """Within this block (main thread only) a SIGINT is remembered as well as raised.

    The previous handler still runs (KeyboardInterrupt in a terminal, the kernel's own
    handler in Jupyter); an ignored SIGINT (a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN or SIG_DFL: nothing to remember or chain
        yield
        return

    def on_sigint(signum, frame):
        _requested.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def requested() -> bool:
    """Whether Ctrl-C was pressed during the active run."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed during the active run (a check point)."""
    if _requested.is_set():
        raise KeyboardInterrupt
