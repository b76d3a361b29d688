"""Local workers forked from a server that imported Dask while the driver started.

A local worker process spends ~0.3 CPU-s importing Dask before it can connect, and with
multiprocessing "spawn" each worker does so itself, only once the driver has imported Dask
and started the scheduler and the nannies. :func:`start` launches multiprocessing's fork
server instead (a separate, single-threaded interpreter): it imports Dask once, on the other
core while the driver does its own start, and each nanny forks its worker from it, ready to
connect. ``emflow run`` uses it for a local cluster on two or more cores.

Measured (2 workers × 1 thread, 32 × 256² stack, 4 alternating triples at load ~2): CPU of the
whole run 1.86-2.12 → 1.63-1.72 s; the first unit starts at 1.21-1.57 s instead of
1.21-1.99 s after launch.

The server is started with the workers' environment (:func:`emflow.cluster.local.worker_env`):
glibc reads its malloc settings when a process starts, and a forked worker inherits the
server's. ``emflow run`` starts it before it imports Dask (or reads the recipe), with Dask's
defaults read from distributed.yaml (:func:`~emflow.cluster.local.default_worker_env`); a
user's Dask config that changes them makes the cluster spawn its workers instead
(:func:`~emflow.cluster.local.worker_environment`). Workers a nanny starts again later
(after a crash) are spawned as usual, and ``EMFLOW_FORKSERVER=0`` in the environment turns
the server off (every worker spawned).
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

#: imported by the server before it forks (each import makes no thread, so forking is safe)
PRELOAD = ("distributed",)

_started = False
#: the environment the running server was started with
_env: dict[str, str] = {}


def running() -> bool:
    """True once :func:`start` launched the server in this process (until :func:`stop`)."""
    return _started


def environment() -> dict[str, str]:
    """The environment the running server (and every worker it forks) was started with."""
    return dict(_env) if _started else {}


def start() -> None:
    """Start the fork server, once, with the workers' environment; on any failure the workers
    are spawned as usual."""
    global _started, _env
    if _started or os.environ.get("EMFLOW_FORKSERVER") == "0":
        return
    import multiprocessing
    import sys
    from multiprocessing import forkserver

    from emflow.cluster.local import default_worker_env, worker_env

    saved: dict[str, str | None] = {}
    try:
        # before the driver imports Dask (emflow run): its defaults, read without it
        env = worker_env() if "dask" in sys.modules else default_worker_env()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # no other thread runs yet: the server's environment only
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
        forkserver.ensure_running()
    except Exception as exc:  # e.g. no distributed.yaml to read, no socket: spawn as Dask does
        logger.info("no fork server (%s): local workers are spawned", exc)
        return
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _started, _env = True, env


def stop() -> None:
    """Stop the server once its workers are gone, and reap it: their CPU time then counts as
    this process's children's (``getrusage``), and nothing outlives the run.

    The server has nothing left to do then, so it is killed (SIGKILL) rather than asked to
    exit: an exit of its own first tears down every module it imported (Dask: 0.1-0.2 s the
    driver waited at the end of each run, and 0.06-0.18 CPU-s).
    """
    global _started
    if not _started:
        return
    _started = False
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop_server = getattr(server, "_stop", None)  # CPython 3.8-3.13; else it exits with us
    if stop_server is None:
        return
    pid = getattr(server, "_forkserver_pid", None)
    _reaped(pid, timeout_s=1.0)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            pass
    stop_server()  # closes its pipe and socket, and reaps it


def _reaped(pid: int | None, timeout_s: float) -> None:
    """Wait (up to ``timeout_s``) until the server has reaped every worker it forked: one it
    has not reaped when it stops is reaped by init, and its CPU time is not counted here."""
    import time

    import psutil  # a dependency of distributed

    if pid is None:
        return
    end = time.monotonic() + timeout_s
    try:
        server = psutil.Process(pid)
        while server.children() and time.monotonic() < end:
            time.sleep(0.01)
    except psutil.Error:
        return
