"""Run emflow (or Python) the way a user's shell does, and leave nothing behind.

Each command gets its own process group (its local Dask scheduler and workers included),
Ctrl-C at its default (a test runner started in the background ignores SIGINT, and children
would inherit that), a timeout, and a SIGKILL of the whole group afterwards, so a test that
fails or times out never leaves workers running into the next test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

#: ``emflow run`` starts its local cluster early, its workers forked from a server, only with two
#: usable cores (emflow.cli.run._start_early); on one core a test of that would test nothing
TWO_CORES = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2,
    reason="needs 2 usable CPU cores (this process may use 1): only then does emflow run start "
    "its local cluster early, with workers forked from a server, which is what this checks",
)


def start(
    argv: list[str] | tuple[str, ...],
    cwd: Path,
    env: dict[str, str | None] | None = None,
    **popen_kw,
) -> subprocess.Popen:
    """``argv`` in its own process group; ``env`` adds to this environment (None: unset)."""
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kw.update(popen_kw)
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env=None if env is None else _merged(env),
        **kw,
    )


def _merged(env: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in {**os.environ, **env}.items() if v is not None}


def start_emflow(
    args: list[str] | tuple[str, ...], cwd: Path, env: dict[str, str | None] | None = None
) -> subprocess.Popen:
    """``emflow *args`` as :func:`start` starts it."""
    return start([sys.executable, "-m", "emflow", *args], cwd, env)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for the command (``timeout`` s) and collect its output."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def outputs(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """(stdout, stderr) of the command once it ended (``timeout`` s); its group killed in any case."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the command's process group (a no-op after a clean exit)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


def run(
    argv: list[str] | tuple[str, ...],
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str | None] | None = None,
    **popen_kw,
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion (or ``timeout``) and kill its process group in any case."""
    proc = start(argv, cwd, env, **popen_kw)
    try:
        return finish(proc, timeout)
    finally:
        kill_group(proc)


def emflow(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """``emflow *args`` run as :func:`run` runs it."""
    return run([sys.executable, "-m", "emflow", *args], cwd, timeout, env)
