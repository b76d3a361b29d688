"""Ctrl-C is never lost during a run, even when it lands inside a callback Python ignores."""

from __future__ import annotations

import gc
import os
import signal
import sys

import pytest

from emflow import interrupts


class _SigintInDel:
    """Receives SIGINT while Python runs its __del__: the KeyboardInterrupt is 'ignored'."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next bytecode boundary, in here
            pass


def _swallowed_ctrl_c(monkeypatch) -> list[type]:
    """Python's own hook reports what it ignored; return those exception types."""
    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    obj = _SigintInDel()
    del obj
    gc.collect()
    monkeypatch.undo()
    return seen


def test_swallowed_ctrl_c_is_raised_at_the_next_check_point(monkeypatch):
    with interrupts.remembered():
        assert _swallowed_ctrl_c(monkeypatch) == [KeyboardInterrupt]  # ignored by Python
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert not interrupts.requested()  # forgotten when the run ends
    interrupts.check()


def test_outside_a_run_nothing_is_remembered_and_the_handler_is_restored(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with interrupts.remembered():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
    assert _swallowed_ctrl_c(monkeypatch) == [KeyboardInterrupt]
    assert not interrupts.requested()
    interrupts.check()


def test_an_ignored_sigint_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.remembered():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
