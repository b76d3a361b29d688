"""Run the units of one stage: serially in-process, or on Dask in a bounded window.

A *unit* is one small, idempotent, serialisable call (one slice, pair or slab)
that writes its own output and returns a small JSON-serialisable dict. Units
of a stage are independent; stages run one after another. On Dask, at most
``window`` units are in flight at once (a few per worker thread), so the
scheduler never holds the whole run and a pause takes effect at once; task
keys are ``("emflow-<stage>-<run_id>", index)`` (the lattice plugin reads them).

With ``run_dir`` (the run folder, see :mod:`emflow.lattice`) every unit runs
inside :func:`durable_call`, which writes the unit's done marker atomically
after the unit function returned; units whose marker exists are skipped and
return their recorded result; the driver appends every outcome to the journal.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from emflow import lattice as lat
from emflow.errors import OutputError, RecipeError, SourceError

logger = logging.getLogger(__name__)

#: exceptions meaning bad input: a unit failing with one stops the run at once, unchanged
FATAL_ERRORS: tuple[type[BaseException], ...] = (SourceError, RecipeError, OutputError)
#: seconds between two pause/cancel queries to the scheduler
CONTROL_POLL_S = 0.2

# failed or orphaned units of each (run_id, journal session) in this process (Unit.needs,
# keep_going); a new session of the same run (emflow run again) starts with none
_FAILED: dict[tuple[str, str | None], dict[tuple[str, int], dict[str, Any]]] = {}


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(*args)`` for item ``index`` of a stage.

    ``needs`` lists ``(stage, index)`` of upstream units; when one of them
    failed (``keep_going=True``) this unit is not run but marked orphaned.
    """

    index: int
    fn: Callable[..., Any]
    args: tuple = ()
    nbytes: int = 0  # input bytes, for the progress rate
    needs: tuple[tuple[str, int], ...] = ()


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


def _worker_name() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


class _QuietBadInput(logging.Filter):
    """Drop the worker's "Compute Failed" log (with traceback) of bad-input errors.

    They are user errors, reported by the driver as one line; other failures
    keep their worker log.
    """

    names = tuple(f"{t.__name__}(" for t in FATAL_ERRORS)

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if (
            isinstance(msg, str)
            and msg.startswith("Compute Failed")
            and isinstance(args, tuple)
            and len(args) > 3
        ):
            return not str(args[3]).startswith(self.names)
        return True


_QUIET = _QuietBadInput()


def durable_call(fn: Callable[..., Any], marker: str | None, *args: Any) -> dict[str, Any]:
    """Run a unit function and then record it durably (runs on the worker).

    Returns ``{"result", "worker", "start", "end", "reused"}``. With a marker
    path, an existing marker is reused (a recomputation after a lost worker is
    a no-op), and otherwise the marker is written atomically *after* ``fn``
    returned (unit functions return only once their output is written). The
    result is round-tripped through JSON so a fresh and a resumed run return
    the same values.
    """
    worker_log = logging.getLogger("distributed.worker")
    if _QUIET not in worker_log.filters:
        worker_log.addFilter(_QUIET)
    if marker is not None:
        old = lat.read_marker(Path(marker))
        if old is not None:
            return {**old, "reused": True}
    start = time.time()
    result = fn(*args)
    end = time.time()
    payload: dict[str, Any] = {
        "result": result,
        "worker": _worker_name(),
        "start": start,
        "end": end,
    }
    if marker is not None:
        import json

        try:
            payload["result"] = json.loads(json.dumps(result))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"unit result of {getattr(fn, '__name__', fn)!r} is not JSON-serialisable ({exc}); "
                "unit functions must return small JSON dicts"
            ) from exc
        lat.write_marker(Path(marker), payload)
    payload["reused"] = False
    return payload


def _error_text(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    return text if len(text) <= 2000 else text[:2000] + "..."


class _Control:
    """Pause/cancel switches of a run, asked of the scheduler plugin every CONTROL_POLL_S."""

    def __init__(self, client: Any, run_id: str, stage: str) -> None:
        self.client, self.run_id, self.stage = client, run_id, stage
        self.ok = client is not None
        self._next = 0.0
        self.paused = False
        self.cancelled = False

    def poll(self, *, force: bool = False) -> None:
        if not self.ok:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + CONTROL_POLL_S
        try:
            ans = self.client.sync(
                self.client.scheduler.emflow_control, run_id=self.run_id, stage=self.stage
            )
        except Exception:  # scheduler without the plugin: no pause/cancel
            logger.warning("lattice plugin not reachable; pause/cancel disabled", exc_info=True)
            self.ok = False
            return
        if not isinstance(ans, dict):
            self.ok = False
            return
        self.paused, self.cancelled = bool(ans["paused"]), bool(ans["cancelled"])


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
    run_dir: Path | None = None,
    keep_going: bool = False,
) -> dict[int, Any]:
    """Run every unit of a stage and return ``{index: result}``.

    With ``client=None`` units run here, in order (notebooks, pdb). With a Dask
    client they are submitted in a window of ``window`` units (default two per
    worker thread); new units are not released while the run or this stage is
    paused (``emflow pause``), and none after ``emflow cancel``.

    A unit is tried at most ``1 + retries`` times; other units keep going. A
    unit raising :class:`~emflow.errors.SourceError`, ``RecipeError`` or
    ``OutputError`` (bad input) stops the stage at once and that exception is
    re-raised unchanged.

    Parameters
    ----------
    run_dir
        Run folder: units with a done marker there are skipped (their recorded
        result is returned), every unit writes its marker after its output,
        and outcomes are appended to ``run_dir/journal.jsonl``. None: no
        markers, no journal.
    keep_going
        When False (default) a stage with units still failing raises
        :class:`~emflow.lattice.IncompleteRun` at its end. When True their
        indices are missing from the result, later units that ``need`` them
        are orphaned, and :func:`check_complete` raises at the end of the run.

    Raises
    ------
    IncompleteRun
        Units still failing after their retries (listed with their errors).
    RunCancelled
        The run was cancelled; units done so far stay done (resumable).
    """
    results: dict[int, Any] = {}
    progress = progress or Progress(stage, len(units), enabled=False)
    total = max((u.index for u in units), default=-1) + 1
    sid = lat.session_id(run_dir) if run_dir is not None else None
    failed_before = _FAILED.setdefault((run_id, sid), {})

    done: dict[int, dict[str, Any]] = (
        lat.done_markers(run_dir, stage) if run_dir is not None else {}
    )
    skipped = [u for u in units if u.index in done]
    todo = [u for u in units if u.index not in done]
    orphaned = [u for u in todo if any(tuple(n) in failed_before for n in u.needs)]
    if orphaned:
        orphan_ids = {u.index for u in orphaned}
        todo = [u for u in todo if u.index not in orphan_ids]

    journal = lat.Journal(run_dir) if run_dir is not None else None
    try:
        if journal is not None:
            journal.append(
                "stage",
                session=sid,
                stage=stage,
                run_id=run_id,
                total=total,
                units=len(units),
                retries=retries,
            )
            if skipped:
                journal.append(
                    "skipped", session=sid, stage=stage, indices=[u.index for u in skipped]
                )
            if orphaned:
                journal.append(
                    "orphaned", session=sid, stage=stage, indices=[u.index for u in orphaned]
                )
        for u in orphaned:
            failed_before[(stage, u.index)] = {
                "stage": stage,
                "index": u.index,
                "attempts": 0,
                "error": "orphaned: an upstream unit failed",
            }

        def deliver(u: Unit, res: Any) -> None:
            results[u.index] = res
            if on_result is not None:
                on_result(u, res)
            progress.advance(u.nbytes)

        for u in skipped:
            deliver(u, done[u.index]["result"])

        def marker(u: Unit) -> str | None:
            return str(lat.marker_path(run_dir, stage, u.index)) if run_dir is not None else None

        def record_done(u: Unit, payload: dict[str, Any], attempts: int) -> None:
            res = payload["result"]
            if journal is not None:
                journal.append(
                    "done",
                    session=sid,
                    stage=stage,
                    index=u.index,
                    attempts=attempts,
                    worker=payload.get("worker"),
                    start=payload.get("start"),
                    end=payload.get("end"),
                    reused=payload.get("reused") or None,
                )
            deliver(u, res)

        def record_failed(
            u: Unit, exc: BaseException, attempts: int, final: bool, worker: Any = None
        ) -> None:
            text = _error_text(exc)
            if journal is not None:
                journal.append(
                    "failed",
                    session=sid,
                    stage=stage,
                    index=u.index,
                    attempts=attempts,
                    final=final,
                    error=text,
                    worker=worker,
                    traceback="".join(traceback.format_exception(exc))[-4000:] if final else None,
                )

        if client is None:
            failures = _run_serial(todo, stage, retries, marker, record_done, record_failed)
            cancelled = False
        else:
            failures, cancelled = _run_dask(
                todo,
                stage,
                client,
                run_id,
                window,
                retries,
                marker,
                record_done,
                record_failed,
                run_dir=run_dir,
                skipped=[u.index for u in skipped],
                orphaned=[u.index for u in orphaned],
                total=total,
                journal=journal,
                sid=sid,
            )
        for f in failures:
            failed_before[(stage, f["index"])] = f
        if journal is not None:
            journal.append(
                "stage_end",
                session=sid,
                stage=stage,
                done=len(results) - len(skipped),
                skipped=len(skipped),
                failed=len(failures),
                orphaned=len(orphaned),
                cancelled=cancelled or None,
            )
        if cancelled:
            left = len(units) - len(results)
            raise lat.RunCancelled(
                f"run cancelled during stage '{stage}': {left} unit(s) of it not done; "
                "run the same command again to resume",
                failures,
            )
        if failures and not keep_going:
            raise lat.IncompleteRun.from_failures(failures, run_dir)
        return results
    finally:
        if journal is not None:
            journal.close()


def check_complete(run_id: str, run_dir: Path | None = None) -> None:
    """Raise :class:`~emflow.lattice.IncompleteRun` if units of ``run_id`` failed (keep_going)."""
    sid = lat.session_id(run_dir) if run_dir is not None else None
    failed = _FAILED.pop((run_id, sid), {})
    if failed:
        raise lat.IncompleteRun.from_failures(list(failed.values()), run_dir)


RecordDone = Callable[[Unit, dict[str, Any], int], None]
RecordFailed = Callable[..., None]


def _run_serial(
    todo: Sequence[Unit],
    stage: str,
    retries: int,
    marker: Callable[[Unit], str | None],
    record_done: RecordDone,
    record_failed: RecordFailed,
) -> list[dict[str, Any]]:
    failures = []
    for u in todo:
        for attempt in range(1, retries + 2):
            try:
                payload = durable_call(u.fn, marker(u), *u.args)
            except FATAL_ERRORS as exc:
                record_failed(u, exc, attempt, True)
                raise
            except Exception as exc:
                final = attempt == retries + 1
                record_failed(u, exc, attempt, final)
                if final:
                    failures.append(
                        {
                            "stage": stage,
                            "index": u.index,
                            "attempts": attempt,
                            "error": _error_text(exc),
                        }
                    )
                continue
            record_done(u, payload, attempt)
            break
    return failures


def _run_dask(
    todo: Sequence[Unit],
    stage: str,
    client: Any,
    run_id: str,
    window: int | None,
    retries: int,
    marker: Callable[[Unit], str | None],
    record_done: RecordDone,
    record_failed: RecordFailed,
    *,
    run_dir: Path | None,
    skipped: list[int],
    orphaned: list[int],
    total: int,
    journal: lat.Journal | None,
    sid: str | None,
) -> tuple[list[dict[str, Any]], bool]:
    from distributed import as_completed

    prefix = unit_key(stage, run_id, 0)[0]
    try:
        lat.ensure_plugin(client)
        client.sync(
            client.scheduler.emflow_begin_stage,
            run_id=run_id,
            stage=stage,
            total=total,
            prefix=prefix,
            skipped=skipped,
            orphaned=orphaned,
            run_dir=str(run_dir) if run_dir is not None else None,
            session=sid,
        )
        if run_dir is not None:
            from emflow.dashboard import dashboard_url

            try:
                dash = dashboard_url(client)
            except Exception:
                dash = None
            lat.write_scheduler_file(
                run_dir, address=client.scheduler.address, dashboard=dash, run_id=run_id
            )
    except Exception:
        logger.warning(
            "could not install the lattice plugin; no dashboard page, pause or cancel",
            exc_info=True,
        )
    control = _Control(client, run_id, stage)
    if window is None:
        threads = sum(client.nthreads().values()) or 1
        window = max(2, 2 * threads)

    pending: deque[Unit] = deque(todo)
    retry: deque[tuple[Any, Unit]] = deque()  # erred futures to retry (same key) on release
    in_flight: dict[Any, Unit] = {}
    attempts: dict[int, int] = {}
    failures: list[dict[str, Any]] = []
    ac = as_completed([], with_results=False)
    was_paused = False

    def release() -> None:
        while (retry or pending) and len(in_flight) < window:
            if retry:
                fut, u = retry.popleft()
                fut.retry()
            else:
                u = pending.popleft()
                fut = client.submit(
                    durable_call,
                    u.fn,
                    marker(u),
                    *u.args,
                    key=unit_key(stage, run_id, u.index),
                    pure=False,
                )
            in_flight[fut.key] = u
            ac.add(fut)

    try:
        while pending or retry or in_flight:
            control.poll()
            if control.cancelled:
                pending.clear()
                for fut, _u in retry:
                    fut.release()
                retry.clear()
            elif control.paused != was_paused:
                was_paused = control.paused
                if journal is not None:
                    journal.append("pause" if was_paused else "resume", session=sid, stage=stage)
            if not control.paused and not control.cancelled:
                release()
            if not in_flight:
                if not (pending or retry):
                    break
                time.sleep(CONTROL_POLL_S)  # paused, nothing running: wait for resume
                continue
            fut = next(ac)
            u = in_flight.pop(fut.key)
            attempts[u.index] = attempts.get(u.index, 0) + 1
            n = attempts[u.index]
            if fut.status == "finished":
                payload = fut.result()
                fut.release()
                record_done(u, payload, n)
                continue
            if fut.status == "cancelled":  # cancelled from outside: run it again
                attempts[u.index] -= 1
                fut.release()
                pending.appendleft(u)
                continue
            exc = fut.exception()
            if isinstance(exc, FATAL_ERRORS):
                record_failed(u, exc, n, True)
                for other in list(ac.futures):
                    other.cancel()
                raise exc
            final = n >= retries + 1 or control.cancelled
            record_failed(u, exc, n, final)
            if final:
                fut.release()
                failures.append(
                    {"stage": stage, "index": u.index, "attempts": n, "error": _error_text(exc)}
                )
            else:
                retry.append((fut, u))
    finally:
        if journal is not None and control.cancelled:
            journal.append("cancel", session=sid, stage=stage)
    return failures, control.cancelled
