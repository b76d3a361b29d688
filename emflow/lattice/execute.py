"""Run the units of one stage: serially in-process, or on Dask in a bounded window.

A *unit* is one small, idempotent, serialisable call (one slice, pair or slab)
that writes its own output and returns a small JSON-serialisable dict. Units
of a stage are independent; stages run one after another. On Dask, at most
``window`` tasks (one unit each, or k: see below) are in flight at once (a few
per worker thread), so the scheduler never holds the whole run and a pause takes
effect at once; task keys are ``("emflow-<stage>-<run_id>", index)`` (the lattice
plugin reads them).

With ``run_dir`` (the run folder, see :mod:`emflow.lattice`) every unit runs
inside :func:`durable_call`, which writes the unit's done marker atomically
after the unit function returned; units whose marker exists are skipped and
return their recorded result; the driver appends every outcome to the journal.

A stage with thousands of units per worker thread (:func:`batch_size`; e.g. the per-slice
stages of a 100,000-slice run) runs up to k units per task, in order (:func:`durable_batch`,
key ``("emflow-<stage>-<run_id>", (i, j, ...))``, see :func:`batch_key`), each still through
its own gate check, done marker, result event and journal records: Dask's per-task cost
(about 2 ms of CPU between driver, scheduler and workers) is then paid once per k units.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from emflow import interrupts
from emflow import lattice as lat
from emflow import progress as progress_display
from emflow.errors import AlignmentError, OutputError, RecipeError, SourceError, deterministic

logger = logging.getLogger(__name__)

#: exceptions meaning bad input: a unit failing with one stops the run at once, unchanged
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    SourceError,
    RecipeError,
    OutputError,
    AlignmentError,
)
#: seconds between two pause/cancel queries to the scheduler
CONTROL_POLL_S = 0.2
#: tasks in flight per worker thread (at least WINDOW_MIN), counting the threads an adaptive
#: cluster may grow to: queued units are what the scheduler's adaptive target sees
WINDOW_PER_THREAD = 4
WINDOW_MIN = 16
#: new units are submitted once this share of the window is free, together (one graph per
#: batch: the scheduler's cost per graph -- its update_graph, an offload to a thread -- and the
#: driver's per submit are paid once per batch); the window stays at least half full
REFILL_SHARE = 0.5
#: units per task where a stage has many units per worker thread: one task runs up to
#: BATCH_MAX units in order (each with its own gate check, marker and result), so Dask's
#: per-task cost (scheduler, worker, driver) is paid once per batch. A stage batches only
#: from BATCH_FROM units per thread (k = units per thread // BATCH_FROM, at most BATCH_MAX):
#: ordinary runs (tens to hundreds of units) keep one unit per task
BATCH_FROM = 1000
BATCH_MAX = 16

# unit events of each run already copied from the plugin to the journal (emflow_control cursor)
_CURSORS: dict[str, int] = {}
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
    """Units done of one stage; shown by the display :mod:`emflow.progress` picks (a table in
    Jupyter, a bar on a terminal, log lines elsewhere; ``enabled=False``: the log only)."""

    stage: str
    total: int
    stream: TextIO | None = None
    enabled: bool | None = None
    done: int = 0
    reused: int = 0  # of ``done``: units an earlier run finished (no rate, no pace)
    nbytes: int = 0
    start: float = field(default_factory=time.perf_counter)
    _last: float = 0.0
    _display: Any = None

    def __post_init__(self) -> None:
        if self.stream is None:
            self.stream = sys.stderr
        self._display = progress_display.display_for(self, self.stream, self.enabled)

    def advance(self, nbytes: int = 0, reused: bool = False) -> None:
        self.done += 1
        self.reused += reused
        self.nbytes += 0 if reused else nbytes
        now = time.perf_counter()
        end = self.done == self.total
        if self._display is not None and (now - self._last > progress_display.REDRAW_S or end):
            self._last = now
            self._display.update(self, now)
        if end:
            shown = not isinstance(self._display, progress_display.LogLines)
            progress_display.stage_finished(self, now, shown=shown)


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


_NO_GATE: set[str] = set()  # schedulers (by address) without the lattice plugin


def _gate(key: Any = None) -> dict[str, Any] | None:
    """May the unit this worker thread runs (``key``: that unit of a batch task) start? From
    the gate table the scheduler pushed to this worker (:mod:`emflow.lattice.gate`), else asked
    of the scheduler (see :meth:`LatticePlugin.gate`); None when not on a Dask worker or there
    is no plugin."""
    try:
        from distributed import get_worker

        worker = get_worker()
        if key is None:
            key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):
        return None
    if not (isinstance(key, tuple) and len(key) == 2 and str(key[0]).startswith("emflow-")):
        return None
    table = worker.plugins.get(lat.GATE_PLUGIN)
    if table is not None:
        ans = table.check(key)
        if ans is not None:
            return ans
    address = str(worker.scheduler.address)
    if address in _NO_GATE:
        return None
    from distributed.utils import sync

    try:
        ans = sync(
            worker.loop,
            worker.scheduler.emflow_gate,
            prefix=key[0],
            index=int(key[1]),
            worker=str(worker.address),
        )
    except Exception:  # a scheduler without the plugin: no pause gate, run the unit
        _NO_GATE.add(address)
        return None
    return ans


def durable_call(
    fn: Callable[..., Any], marker: str | None, *args: Any, _key: Any = None
) -> dict[str, Any]:
    """:func:`_durable_call`, with failures that would recur (no space, no permission) made
    one-line :class:`~emflow.errors.EmflowError` s, so the run stops at once instead of retrying.
    """
    try:
        return _durable_call(fn, marker, *args, _key=_key)
    except Exception as exc:
        err = deterministic(exc)
        if err is None or err is exc:
            raise
        raise err from exc


def _durable_call(
    fn: Callable[..., Any], marker: str | None, *args: Any, _key: Any = None
) -> dict[str, Any]:
    """Run a unit function and then record it durably (runs on the worker).

    Returns ``{"result", "worker", "start", "end", "attempt", "reused"}``, or
    ``{"deferred": True}`` when the run's pause/cancel gate did not let the unit start
    (it goes back to waiting). With a marker path, an existing marker is reused (a
    recomputation after a lost worker is a no-op), and otherwise the marker is written
    atomically *after* ``fn`` returned (unit functions return only once their output is
    written). The result is round-tripped through JSON so a fresh and a resumed run
    return the same values. ``_key``: the unit's own key when it runs inside a batch task
    (:func:`durable_batch`); None: the task's key.
    """
    worker_log = logging.getLogger("distributed.worker")
    if _QUIET not in worker_log.filters:
        worker_log.addFilter(_QUIET)
    if marker is not None:
        old = lat.read_marker(Path(marker))
        if old is not None:
            return _sent({**old, "reused": True}, _key)
    gate = _gate(_key)
    if gate is not None and not gate.get("go", True):
        return _sent({"deferred": True}, _key)
    start = time.time()
    result = fn(*args)
    end = time.time()
    payload: dict[str, Any] = {
        "result": result,
        "worker": _worker_name(),
        "start": start,
        "end": end,
        "attempt": gate.get("attempt") if gate else None,
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
        lat.write_marker(Path(marker), payload, durable=False)  # see lattice.markers
    payload["reused"] = False
    return _sent(payload, _key)


def _sent(payload: dict[str, Any], key: Any = None) -> dict[str, Any]:
    """The unit's payload, also sent to its driver ahead of the task's result when on a worker
    with the gate plugin (:mod:`emflow.lattice.gate`): no gather round trip per unit.
    ``key``: the unit's key inside a batch task (the lattice marks it done on receipt)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        batch = key is not None
        if key is None:
            key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):
        return payload
    table = worker.plugins.get(lat.GATE_PLUGIN)
    if table is not None and isinstance(key, tuple) and len(key) == 2:
        table.send_result(key, payload, batch=batch)
    return payload


def durable_batch(
    prefix: str, units: Sequence[tuple[int, Callable[..., Any], str | None, tuple]]
) -> list[dict[str, Any]]:
    """Run units ``(index, fn, marker, args)`` of one stage in one task, in order, each as
    :func:`durable_call` runs it alone: its own gate check, done marker, result event.

    Returns one payload per unit, in order. Once the gate refuses a unit (paused, cancelled)
    it and the rest come back ``{"deferred": True}`` without running. A unit that raises stops
    the batch: the exception propagates with ``emflow_unit`` set to that unit's index (the
    units before it are done: markers written, results sent), so the driver redoes only the
    units of the batch that did not finish.
    """
    out: list[dict[str, Any]] = []
    for pos, (index, fn, marker, args) in enumerate(units):
        try:
            payload = durable_call(fn, marker, *args, _key=(prefix, index))
        except BaseException as exc:
            try:
                exc.emflow_unit = index  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover - exceptions without a __dict__
                pass
            raise
        out.append(payload)
        if payload.get("deferred"):
            out.extend({"deferred": True} for _ in units[pos + 1 :])
            break
    return out


def _driver_marker(run_dir: Path, stage: str, index: int, payload: dict[str, Any]) -> dict:
    """Write a unit's done marker in the driver (a mirrored run folder: workers cannot reach
    it); the unit's output is already in the bucket, so the marker never vouches too early."""
    import json

    payload = {**payload, "result": json.loads(json.dumps(payload["result"]))}
    keep = ("result", "worker", "start", "end", "attempt")
    marker = {k: payload.get(k) for k in keep}
    lat.write_marker(lat.marker_path(run_dir, stage, index), marker, durable=False)
    return payload


def _error_text(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    return text if len(text) <= 2000 else text[:2000] + "..."


def _pause_after(stage: str) -> int | None:
    """``EMFLOW_PAUSE_AFTER=stage:N[,stage:N]``: pause ``stage`` once N of its units started.

    For reproducing an interruption at a chosen point of a run (tests, bug reports):
    the run holds there until ``emflow resume`` (or is stopped); N=0 pauses before the
    stage's first unit.
    """
    for item in os.environ.get("EMFLOW_PAUSE_AFTER", "").split(","):
        name, sep, n = item.strip().rpartition(":")
        if sep and name == stage and n.strip().isdigit():
            return int(n)
    return None


class _Control:
    """Pause/cancel switches of a run, asked of the scheduler plugin every CONTROL_POLL_S.

    Each poll also fetches the unit events the plugin saw (started on a worker, lost
    with its worker) and appends them to the journal.
    """

    def __init__(
        self, client: Any, run_id: str, stage: str, journal: Any = None, sid: str | None = None
    ) -> None:
        self.client, self.run_id, self.stage = client, run_id, stage
        self.journal, self.sid = journal, sid
        self.ok = client is not None
        self._next = 0.0
        self.paused = False
        self.cancelled = False
        self.was_paused = False
        self._lost = 0  # polls in a row that found no scheduler

    def poll(self, *, force: bool = False) -> None:
        interrupts.check()  # a Ctrl-C a library callback swallowed is raised here again
        if not self.ok:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + CONTROL_POLL_S
        try:
            ans = self.client.sync(
                self.client.scheduler.emflow_control,
                run_id=self.run_id,
                stage=self.stage,
                cursor=_CURSORS.get(self.run_id, 0),
            )
        except Exception as exc:
            if _scheduler_gone(self.client, exc):
                self._lost += 1
                if self._lost >= 3 or self.client.status not in ("running", "newly-created"):
                    raise  # the run cannot go on (a paused run would otherwise wait forever)
                return
            # a scheduler without the plugin: no pause/cancel
            logger.warning("lattice plugin not reachable; pause/cancel disabled", exc_info=True)
            self.ok = False
            return
        self._lost = 0
        if not isinstance(ans, dict):
            self.ok = False
            return
        self.paused, self.cancelled = bool(ans["paused"]), bool(ans["cancelled"])
        if "cursor" in ans:
            _CURSORS[self.run_id] = int(ans["cursor"])
        if self.journal is not None:
            for ev in ans.get("events", ()):
                rec = {k: v for k, v in ev.items() if k not in ("event", "t")}
                self.journal.append(ev["event"], session=self.sid, at=ev.get("t"), **rec)
            if self.paused != self.was_paused:
                self.journal.append(
                    "pause" if self.paused else "resume", session=self.sid, stage=self.stage
                )
        self.was_paused = self.paused

    def call(self, op: str, **kw: Any) -> Any:
        """One RPC to the plugin; None when it is not reachable."""
        if not self.ok:
            return None
        try:
            return self.client.sync(getattr(self.client.scheduler, op), **kw)
        except Exception:
            logger.warning("lattice plugin call %s failed", op, exc_info=True)
            return None


def _scheduler_gone(client: Any, exc: BaseException) -> bool:
    """The scheduler cannot be reached (its connection closed or refused), not a missing plugin."""
    return isinstance(exc, OSError) or client.status not in ("running", "newly-created")


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
    where: str = "workers",
    labels: Sequence[str] | None = None,
    batch: int | None = None,
) -> dict[int, Any]:
    """Run every unit of a stage and return ``{index: result}``.

    With ``client=None`` units run here, in order (notebooks, pdb). With a Dask
    client they are submitted in a window of ``window`` tasks of up to ``batch`` units each
    (default WINDOW_PER_THREAD per thread the cluster has or may adapt to, at least
    WINDOW_MIN), refilled in batches once
    REFILL_SHARE of it is free; each unit passes the run's
    start gate on its worker, so none starts while the run or this stage is paused (``emflow pause``) and none after
    ``emflow cancel``. ``where="driver"`` runs the units here, in order, yet through
    the same gate and lattice (the solve and finalize steps of a pipeline).

    A unit is tried at most ``1 + retries`` times; other units keep going. A
    unit raising :class:`~emflow.errors.SourceError`, ``RecipeError`` or
    ``OutputError`` (bad input) stops the stage at once and that exception is
    re-raised unchanged.

    Parameters
    ----------
    run_dir
        Run folder: units with a done marker there are skipped (their recorded
        result is returned), every unit writes its marker after its output,
        and what happens to every unit (started, done, failed, lost, skipped) is
        appended to ``run_dir/journal.jsonl``. None: no markers, no journal.
    keep_going
        When False (default) a stage with units still failing raises
        :class:`~emflow.lattice.IncompleteRun` at its end. When True their
        indices are missing from the result, later units that ``need`` them
        are orphaned, and :func:`check_complete` raises at the end of the run.
    labels
        Per-unit labels for the dashboard (e.g. the z range of a slab).
    batch
        Units per Dask task (units in order, run one after another by
        :func:`durable_batch`, each with its own gate check, marker, result and journal
        records). None (default): :func:`batch_size` of the stage's units per worker
        thread -- 1 (a task per unit) unless the stage has thousands of units per thread.

    Raises
    ------
    IncompleteRun
        Units still failing after their retries (listed with their errors).
    RunCancelled
        The run was cancelled; units done so far stay done (resumable).
    """
    # a bucket output_dir's run folder is a local copy mirrored to the bucket
    # (emflow.io.runmirror): workers cannot reach it, so the driver writes their markers
    from emflow.io import runmirror

    mirror = runmirror.for_dir(run_dir)
    if mirror is None:
        return _run_stage(
            stage, units, client=client, run_id=run_id, window=window, retries=retries,
            progress=progress, on_result=on_result, run_dir=run_dir, keep_going=keep_going,
            where=where, labels=labels, driver_markers=False, batch=batch,
        )  # fmt: skip
    mirror.flush()
    mirror.live(True)
    try:
        results = _run_stage(
            stage, units, client=client, run_id=run_id, window=window, retries=retries,
            progress=progress, on_result=on_result, run_dir=run_dir, keep_going=keep_going,
            where=where, labels=labels, driver_markers=client is not None and where != "driver",
            batch=batch,
        )  # fmt: skip
    except BaseException as exc:
        mirror.live(False)
        if not runmirror.store_down(exc):  # keep what is done (unless the store is gone)
            try:
                mirror.flush()
            except Exception as err:  # the stage's own error is the one to report
                logger.warning("could not copy the run folder to %s: %s", mirror.remote.url, err)
        raise
    mirror.live(False)
    mirror.flush()
    return results


def _run_stage(
    stage: str,
    units: Sequence[Unit],
    *,
    client: Any,
    run_id: str,
    window: int | None,
    retries: int,
    progress: Progress | None,
    on_result: Callable[[Unit, Any], None] | None,
    run_dir: Path | None,
    keep_going: bool,
    where: str,
    labels: Sequence[str] | None,
    driver_markers: bool,
    batch: int | None = None,
) -> dict[int, Any]:
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
    # units an earlier driver started but did not finish: they will be redone
    redo = sorted(set(lat.earlier_attempts(run_dir, stage)) & {u.index for u in todo})

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
                redo=redo or None,
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

        def deliver(u: Unit, res: Any, reused: bool = False) -> None:
            results[u.index] = res
            if on_result is not None:
                on_result(u, res)
            progress.advance(u.nbytes, reused=reused)

        for u in skipped:
            deliver(u, done[u.index]["result"], reused=True)

        # the folder of the stage's markers, as lat.marker_path names it (a join per unit)
        folder = str(lat.marker_path(run_dir, stage, 0).parent) if run_dir is not None else ""

        def marker(u: Unit) -> str | None:  # the path a worker writes (None: the driver does)
            if run_dir is None or driver_markers:
                return None
            return os.path.join(folder, f"{u.index}.json")

        def record_start(u: Unit, attempt: int, worker: str | None) -> None:
            if journal is not None:
                journal.append(
                    "start", session=sid, stage=stage, index=u.index, worker=worker,
                    attempt=attempt,
                )  # fmt: skip

        def record_done(u: Unit, payload: dict[str, Any], attempts: int) -> None:
            if driver_markers and run_dir is not None:  # as durable_call does on a worker
                payload = _driver_marker(run_dir, stage, u.index, payload)
            res = payload["result"]
            attempts = int(payload.get("attempt") or attempts)
            if journal is not None:
                journal.append(
                    "done",
                    session=sid,
                    stage=stage,
                    index=u.index,
                    attempts=attempts,
                    redone=(attempts > 1 or u.index in redo) or None,
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

        hooks = _Hooks(stage, marker, record_start, record_done, record_failed)
        control = None
        if client is not None:
            control = _begin(
                client, stage, run_id, run_dir, journal, sid, total,
                skipped=[u.index for u in skipped], orphaned=[u.index for u in orphaned],
                redo=redo, labels=labels,
            )  # fmt: skip
        if client is None:
            failures, cancelled = _run_here(todo, retries, hooks, None, run_id)
        elif where == "driver":
            failures, cancelled = _run_here(todo, retries, hooks, control, run_id)
        else:
            failures, cancelled = _run_dask(
                todo, client, run_id, window, retries, hooks, control, journal, sid, batch
            )
        for f in failures:
            failed_before[(stage, f["index"])] = f
        if run_dir is not None:
            lat.sync_markers(run_dir, stage)  # the stage's marker folder, once
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


def declare_plan(
    stages: Sequence[dict[str, Any]],
    *,
    client: Any = None,
    run_id: str = "run",
    run_dir: Path | None = None,
) -> None:
    """Announce every stage of a run before it begins: ``[{"stage", "total", "labels"?}]``.

    The dashboard and ``emflow status`` show the whole run from its start (stages not
    begun yet marked as planned: their unit counts may still change, e.g. slabs once
    the alignment fixed the output frame). Journaled, and sent to the lattice plugin.
    """
    sid = lat.session_id(run_dir) if run_dir is not None else None
    if run_dir is not None:
        with lat.Journal(run_dir) as j:
            j.append(
                "plan", session=sid, run_id=run_id,
                stages=[{k: v for k, v in s.items() if k != "labels"} for s in stages],
            )  # fmt: skip
    if client is None:
        return
    try:
        lat.ensure_plugin(client)
        client.sync(
            client.scheduler.emflow_plan,
            run_id=run_id,
            stages=[dict(s) for s in stages],
            run_dir=str(run_dir) if run_dir is not None else None,
            session=sid,
        )
    except Exception:
        logger.warning("could not announce the run's stages to the lattice", exc_info=True)


def check_complete(run_id: str, run_dir: Path | None = None) -> None:
    """Raise :class:`~emflow.lattice.IncompleteRun` if units of ``run_id`` failed (keep_going)."""
    sid = lat.session_id(run_dir) if run_dir is not None else None
    failed = _FAILED.pop((run_id, sid), {})
    if failed:
        raise lat.IncompleteRun.from_failures(list(failed.values()), run_dir)


@dataclass(frozen=True)
class _Hooks:
    """What the runners call back: marker path, and journal records of a stage's units."""

    stage: str
    marker: Callable[[Unit], str | None]
    start: Callable[[Unit, int, str | None], None]
    done: Callable[[Unit, dict[str, Any], int], None]
    failed: Callable[..., None]


def _begin(
    client: Any,
    stage: str,
    run_id: str,
    run_dir: Path | None,
    journal: Any,
    sid: str | None,
    total: int,
    **declared: Any,
) -> _Control:
    """Install the plugin, declare the stage to it, arm ``EMFLOW_PAUSE_AFTER``; the control."""
    prefix = unit_key(stage, run_id, 0)[0]
    try:
        lat.ensure_plugin(client)
        client.sync(
            client.scheduler.emflow_begin_stage,
            run_id=run_id,
            stage=stage,
            total=total,
            prefix=prefix,
            run_dir=str(run_dir) if run_dir is not None else None,
            session=sid,
            client=getattr(client, "id", None),  # the units' results come to this client
            **{k: (list(v) if v is not None else None) for k, v in declared.items()},
        )
        after = _pause_after(stage)
        if after is not None:
            client.sync(client.scheduler.emflow_pause, run_id=run_id, stage=stage, after=after)
        if run_dir is not None and (lat.read_scheduler_file(run_dir) or {}).get("session") != sid:
            lat.announce_run(client, run_dir, run_id)
    except Exception:
        logger.warning(
            "could not install the lattice plugin; no dashboard page, pause or cancel",
            exc_info=True,
        )
    return _Control(client, run_id, stage, journal, sid)


def _run_here(
    todo: Sequence[Unit],
    retries: int,
    hooks: _Hooks,
    control: _Control | None,
    run_id: str,
) -> tuple[list[dict[str, Any]], bool]:
    """Run units in this process, in order; with a control, through the run's gate and lattice."""
    failures = []
    prefix = unit_key(hooks.stage, run_id, 0)[0]

    def report(u: Unit, transition: str, error: str | None = None) -> None:
        if control is not None:
            control.call(
                "emflow_report", run_id=run_id, stage=hooks.stage, index=u.index,
                transition=transition, worker="driver", error=error,
            )  # fmt: skip

    for u in todo:
        interrupts.check()
        for attempt in range(1, retries + 2):
            if control is not None:  # wait at the gate while paused; stop when cancelled
                while True:
                    ans = control.call(
                        "emflow_gate", prefix=prefix, index=u.index, worker="driver", task=False
                    )
                    if ans is None or ans.get("go", True):
                        attempt = int((ans or {}).get("attempt") or attempt)
                        break
                    control.poll(force=True)
                    if control.cancelled:
                        return failures, True
                    time.sleep(CONTROL_POLL_S)
                control.poll()
            hooks.start(u, attempt, "driver" if control is not None else None)
            try:
                payload = durable_call(u.fn, hooks.marker(u), *u.args)
            except FATAL_ERRORS as exc:
                hooks.failed(u, exc, attempt, True)
                report(u, "fail", _error_text(exc))
                raise
            except Exception as exc:
                final = attempt >= retries + 1
                hooks.failed(u, exc, attempt, final)
                report(u, "fail", _error_text(exc))
                if final:
                    failures.append(
                        {
                            "stage": hooks.stage,
                            "index": u.index,
                            "attempts": attempt,
                            "error": _error_text(exc),
                        }
                    )
                    break
                continue
            report(u, "finish")
            hooks.done(u, {**payload, "attempt": attempt}, attempt)
            break
    if control is not None:
        control.poll(force=True)
    return failures, bool(control is not None and control.cancelled)


def _next_ready(ac: Any, timeout: float) -> list[Any]:
    """Futures of ``ac`` that are done, waiting at most ``timeout`` s for one."""
    if not ac.has_ready():
        cond = getattr(ac, "thread_condition", None)
        if cond is not None:
            with cond:
                if not ac.has_ready():
                    cond.wait(timeout=timeout)
        else:  # pragma: no cover - other distributed versions
            time.sleep(min(timeout, 0.01))
    return ac.next_batch(block=False) if ac.has_ready() else []


def _window(client: Any) -> int:
    """Tasks to keep in flight (each of up to k units, see :func:`batch_size`):
    WINDOW_PER_THREAD per thread the cluster has or may adapt to, at least WINDOW_MIN."""
    return max(WINDOW_MIN, WINDOW_PER_THREAD * _threads(client))


def _threads(client: Any) -> int:
    """Worker threads the cluster has or may adapt to (at least 1)."""
    nthreads = client.nthreads()
    threads = sum(nthreads.values())
    per_worker = threads / len(nthreads) if nthreads else 1
    adaptive = getattr(getattr(client, "cluster", None), "_adaptive", None)
    maximum = getattr(adaptive, "maximum", None) if adaptive is not None else None
    if isinstance(maximum, int | float) and maximum < float("inf"):
        threads = max(threads, int(maximum * per_worker))
    return max(1, threads)


def batch_size(units: int, threads: int) -> int:
    """Units per task for a stage of ``units`` units on ``threads`` worker threads (see
    BATCH_FROM): 1 below BATCH_FROM units per thread, at most BATCH_MAX."""
    per_thread = units // max(1, threads)
    return max(1, min(BATCH_MAX, per_thread // BATCH_FROM))


def batch_key(
    stage: str, run_id: str, indices: Sequence[int], generation: int = 0
) -> tuple[Any, ...]:
    """The Dask key of a batch task: ``("emflow-<stage>-<run>", (i, j, ...))`` (its units);
    ``generation`` > 0 (the same first unit submitted again): ``(..., (i, j, ...), generation)``,
    so a batch submitted again never shares a key with an earlier task (whose release may not
    have reached the scheduler yet: the new future would attach to the old, erred task)."""
    key = (unit_key(stage, run_id, 0)[0], tuple(int(i) for i in indices))
    return key if generation <= 0 else (*key, int(generation))


def _submit_batches(
    client: Any,
    units: list[Unit],
    k: int,
    hooks: _Hooks,
    stage: str,
    run_id: str,
    firsts: dict[int, int],
) -> list[tuple[Any, list[Unit]]]:
    """``(future, its units)`` of :func:`durable_batch` tasks of up to ``k`` units of ``units``
    in order: one ``Client.map`` (one graph). ``firsts``: unit index -> tasks submitted so far
    that began with it (updated; the key's generation, see :func:`batch_key`)."""
    groups = [units[i : i + k] for i in range(0, len(units), k)]
    gens = []
    for g in groups:
        n = firsts.get(g[0].index, 0)
        firsts[g[0].index] = n + 1
        gens.append(n)
    prefix = unit_key(stage, run_id, 0)[0]
    specs = [[(u.index, u.fn, hooks.marker(u), tuple(u.args)) for u in g] for g in groups]
    paths = [spec[2] for g in specs for spec in g if spec[2] is not None]
    if paths:
        lat.reserve_markers(paths)
    futures = client.map(
        durable_batch, [prefix] * len(groups), specs,
        key=[batch_key(stage, run_id, [u.index for u in g], n) for g, n in zip(groups, gens)],
        pure=False,
    )  # fmt: skip
    return list(zip(futures, groups, strict=True))


def _submit_units(
    client: Any, call: Callable[..., Any], batch: list[Unit], hooks: _Hooks, stage: str, run_id: str
) -> list[Any]:
    """Futures of ``call(u.fn, marker, *u.args)`` for the units of ``batch``, in order: one
    ``Client.map`` (one graph) per run of units with the same number of arguments."""
    futures: list[Any] = []
    start = 0
    while start < len(batch):
        nargs = len(batch[start].args)
        end = start + 1
        while end < len(batch) and len(batch[end].args) == nargs:
            end += 1
        part = batch[start:end]
        if len(part) == 1:
            u = part[0]
            futures.append(
                client.submit(
                    call, u.fn, hooks.marker(u), *u.args,
                    key=unit_key(stage, run_id, u.index), pure=False,
                )  # fmt: skip
            )
        else:
            columns = [[u.args[i] for u in part] for i in range(nargs)]
            futures.extend(
                client.map(
                    call, [u.fn for u in part], [hooks.marker(u) for u in part], *columns,
                    key=[unit_key(stage, run_id, u.index) for u in part], pure=False,
                )  # fmt: skip
            )
        start = end
    return futures


def _run_dask(
    todo: Sequence[Unit],
    client: Any,
    run_id: str,
    window: int | None,
    retries: int,
    hooks: _Hooks,
    control: _Control,
    journal: lat.Journal | None,
    sid: str | None,
    batch: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    from distributed import as_completed

    stage = hooks.stage
    fixed_window = window
    window = fixed_window or _window(client)
    next_window = time.monotonic() + 2.0
    # units per task (1: one task per unit, keyed by it); the window counts tasks
    k = max(1, int(batch)) if batch is not None else batch_size(len(todo), _threads(client))

    pending: deque[Unit] = deque(todo)
    retry: deque[tuple[Any, Unit]] = deque()  # erred futures to retry (same key) on release
    in_flight: dict[Any, Unit] = {}
    batches: dict[Any, list[Unit]] = {}  # batch task key -> its units (k > 1)
    firsts: dict[int, int] = {}  # unit index -> batch tasks begun with it (key generations)
    attempts: dict[int, int] = {}
    failures: list[dict[str, Any]] = []
    # results come ahead of the completions as client events (emflow.lattice.gate), else
    # (no gate plugin on the worker) they are gathered: no round trip per unit in the first case
    ac = as_completed([], raise_errors=False)
    delivered: dict[Any, dict[str, Any]] = {}
    prefix = unit_key(stage, run_id, 0)[0]
    topic = lat.RESULT_TOPIC.format(prefix=prefix)

    listening = [True]

    def on_result_event(event: Any) -> None:  # on the client's event loop
        if listening[0]:  # (a unit of a stopped stage may still report: dropped)
            index, blob, attempt = event
            payload = pickle.loads(blob)
            if payload.get("attempt") is None and attempt:  # the scheduler's count
                payload["attempt"] = attempt
            delivered[(prefix, int(index))] = payload

    try:
        client.subscribe_topic(topic, on_result_event)
    except Exception:  # no events (a closed client fails at its first submit anyway)
        pass

    def release() -> None:
        nonlocal window, next_window
        if fixed_window is None and time.monotonic() > next_window:  # workers join and leave
            window, next_window = _window(client), time.monotonic() + 2.0
        while retry and len(in_flight) < window:
            fut, u = retry.popleft()
            fut.retry()
            in_flight[fut.key] = u
            ac.add(fut)
        free = window - len(in_flight)
        if not pending or free <= 0:
            return
        # new units go in batches (one graph each: the scheduler's per-graph cost is paid
        # once per batch, not per unit) once a REFILL_SHARE of the window is free
        tasks = -(-len(pending) // k)  # the pending units make this many tasks
        if in_flight and free < min(tasks, max(1, int(window * REFILL_SHARE))):
            return
        if k > 1:
            batch = [pending.popleft() for _ in range(min(free * k, len(pending)))]
            for fut, group in _submit_batches(client, batch, k, hooks, stage, run_id, firsts):
                batches[fut.key] = group
                in_flight[fut.key] = group[0]
                ac.add(fut)
            return
        batch = [pending.popleft() for _ in range(min(free, len(pending)))]
        for fut, u in zip(_submit_units(client, durable_call, batch, hooks, stage, run_id), batch):
            in_flight[fut.key] = u
            ac.add(fut)

    def finished(u: Unit, payload: dict[str, Any]) -> None:
        attempts[u.index] = attempts.get(u.index, 0) + 1
        hooks.done(u, payload, attempts[u.index])

    def failed(u: Unit, exc: BaseException) -> bool:
        """Record an attempt of ``u`` that raised ``exc``; True: it failed for good (no retries
        left, or cancelled). A FATAL_ERRORS exception cancels the rest and is raised."""
        attempts[u.index] = n = attempts.get(u.index, 0) + 1
        if isinstance(exc, FATAL_ERRORS):
            hooks.failed(u, exc, n, True)
            for other in list(ac.futures):
                other.cancel()
            raise exc
        final = n >= retries + 1 or control.cancelled
        hooks.failed(u, exc, n, final)
        if final:
            failures.append(
                {"stage": stage, "index": u.index, "attempts": n, "error": _error_text(exc)}
            )
        return final

    def batch_ended(fut: Any, group: list[Unit]) -> None:
        """Record the units of a batch task that ended: done ones done, the failed one failed
        (or tried again), the rest back to waiting (they are submitted again)."""
        payloads = [delivered.pop((prefix, u.index), None) for u in group]
        exc: BaseException | None = None
        if fut.status == "finished":
            if any(p is None for p in payloads):  # not sent ahead: gather them
                payloads = [p or q for p, q in zip(payloads, fut.result(), strict=True)]
        elif fut.status != "cancelled":
            exc = fut.exception()
        fut.release()
        failed_at = getattr(exc, "emflow_unit", None)
        if exc is not None and failed_at is None:
            # the task ended without saying which unit failed (its worker died and Dask gave
            # up: KilledWorker; an exception without attributes): the unit running then, the
            # first with no result (results reach the driver in order, ahead of the task's end)
            failed_at = next((u.index for u, p in zip(group, payloads) if p is None), None)
        again: list[Unit] = []
        deferred = False
        for u, payload in zip(group, payloads, strict=True):
            if payload is not None and not payload.get("deferred"):
                finished(u, payload)
                continue
            deferred = deferred or payload is not None
            if exc is None or u.index != failed_at:
                again.append(u)  # not run (refused, cancelled, after the failed unit)
            elif not failed(u, exc):
                again.append(u)
        if again and not control.cancelled:
            pending.extendleft(reversed(again))
        if deferred:
            control.poll(force=True)

    try:
        while pending or retry or in_flight:
            control.poll()
            if control.cancelled:
                pending.clear()
                for fut, _u in retry:
                    fut.release()
                retry.clear()
            if not control.paused and not control.cancelled:
                release()
            if not in_flight:
                if not (pending or retry):
                    break
                time.sleep(CONTROL_POLL_S)  # paused, nothing running: wait for resume
                continue
            for fut in _next_ready(ac, CONTROL_POLL_S):
                u = in_flight.pop(fut.key)
                group = batches.pop(fut.key, None)
                if group is not None:
                    batch_ended(fut, group)
                    continue
                payload = delivered.pop(fut.key, None)
                if fut.status == "finished":
                    if payload is None:  # not sent ahead: gather it
                        payload = fut.result()
                    fut.release()
                    if payload.get("deferred"):  # refused at the gate: paused or cancelled
                        if not control.cancelled:
                            pending.appendleft(u)
                        control.poll(force=True)
                        continue
                    finished(u, payload)
                    continue
                if fut.status == "cancelled":  # cancelled from outside: run it again
                    fut.release()
                    pending.appendleft(u)
                    continue
                if failed(u, fut.exception()):
                    fut.release()
                else:
                    retry.append((fut, u))
    finally:
        # the handler stays subscribed but inert: unsubscribing here would make results that
        # are still on their way log "no event handler known" errors in the client
        listening[0] = False
        control.poll(force=True)  # the last unit events into the journal
        if journal is not None and control.cancelled:
            journal.append("cancel", session=sid, stage=stage)
    return failures, control.cancelled
