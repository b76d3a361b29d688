"""A cluster that starts in a background thread while the driver checks and plans the run.

``emflow run`` on a local cluster spends about a second starting it (the scheduler, then
worker processes that import Dask); the driver meanwhile has its own work that needs no
cluster (the checks of :func:`emflow.preflight.preflight`, discovering the stack, importing
the pipeline). :class:`EarlyCluster` runs :func:`emflow.cluster.open_client` in a thread so
both go on at once; :meth:`EarlyCluster.client` hands its client over once the run may start,
and :meth:`EarlyCluster.close` shuts down, quietly, a cluster the run never used (the checks
refused the run, or Ctrl-C).

Starting a local cluster writes nothing in the run folder or the outputs (Dask's scratch
space is in the temporary directory), so it may begin before the checks passed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any


class EarlyCluster:
    """``open_client(request)`` entered in a background thread, from construction on."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self._cm: AbstractContextManager[Any] | None = None
        self._client: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._start, name="emflow-cluster-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from emflow import cluster as clusters

            cm = clusters.open_client(self.request)
            self._client = cm.__enter__()
            self._cm = cm
        except BaseException as exc:  # raised in the caller's thread by client()
            self._error = exc

    def spawned(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until the cluster has spawned a worker process or its start
        has ended; True if a worker process runs. The driver is one interpreter: its own
        imports, run while the scheduler starts, delay the spawn, and the workers' imports
        (~0.45 CPU-s each, in their own processes) only begin after it."""
        import multiprocessing.process
        import time

        # the processes this one started with multiprocessing (a Nanny's worker process, not
        # the resource tracker), read without polling them: active_children() would reap an
        # exit status that the Nanny's own watcher waits for (CPython 3.8-3.13 keep the set)
        started = getattr(multiprocessing.process, "_children", None)
        if started is None:
            return False
        end = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < end:
            if started:
                return True
            time.sleep(0.005)
        return bool(started)

    def _wait(self) -> None:
        """Until the start has ended (a lock wait: Ctrl-C still reaches the main thread)."""
        while self._thread.is_alive():
            self._thread.join(0.1)

    @contextmanager
    def client(self) -> Iterator[Any]:
        """Wait for the start and yield its client; on exit close client and cluster as
        :func:`~emflow.cluster.open_client` does. The start's error is raised here."""
        try:
            self._wait()
        except BaseException:
            self.close()
            raise
        if self._error is not None:
            error, self._error = self._error, None
            self._closed = True
            raise error
        assert self._cm is not None
        cm, self._closed = self._cm, True
        try:
            yield self._client
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            cm.__exit__(None, None, None)

    def close(self) -> None:
        """Shut down a cluster :meth:`client` never handed over (waits for its start to end);
        errors of its start or close are dropped: the run's own error is the one to report."""
        if self._closed:
            return
        self._wait()  # (a Ctrl-C here leaves it to a later close: not yet closed)
        self._closed = True
        if self._cm is not None:
            try:
                self._cm.__exit__(None, None, None)
            except Exception:
                pass
