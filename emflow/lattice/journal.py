"""The run folder's append-only journal (``journal.jsonl``): writer, reader, replay, sessions.

:class:`Journal` appends events, :func:`read_journal` reads them back,
:func:`summarize_journal` replays them into a lattice snapshot for ``emflow status``,
and :func:`start_session` reconciles the journal with the done markers.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emflow.lattice.markers import MARKERS, RUN_JSON, done_markers
from emflow.lattice.state import Lattice, R

JOURNAL = "journal.jsonl"
# one encoder for every record (json.dumps with options builds a new one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


# --------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSONL event log of a run folder (written by the driver only).

    Each line is one JSON object with at least ``event`` and ``t`` (epoch s).
    Lines are flushed at once and fsync'd at most every ``sync_s`` seconds and
    on :meth:`close` (the markers, not the journal, are the durable truth).
    """

    def __init__(self, run_dir: Path, *, sync_s: float = 0.5) -> None:
        self.path = Path(run_dir) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        self._sync_s = sync_s
        self._last_sync = 0.0

    def append(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "t": round(time.time(), 3), **fields}
        self._fh.write(_ENCODER.encode(rec) + "\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self._sync_s:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The journal's records in order; a torn last line (crash mid-write) is ignored."""
    path = Path(run_dir) / JOURNAL
    try:
        fh = open(path)
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def summarize_journal(run_dir: Path, *, stopped: bool = False) -> dict[str, Any]:
    """Replay the journal into a lattice snapshot (same shape as :meth:`Lattice.snapshot`).

    Used by ``emflow status`` when no run is live. The last session's view is
    shown: units done in earlier sessions count as skipped when the last
    session skipped them, as done otherwise. With ``stopped`` (the driver is known
    to be gone) units still queued or running at the end were lost with it.
    """
    lat = Lattice()
    try:  # the pipeline's run_id is the recipe fingerprint
        run_id = str(json.loads((Path(run_dir) / RUN_JSON).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        run_id = "?"
    sessions = 0
    last_event: dict[str, Any] | None = None
    for rec in read_journal(run_dir):
        ev = rec.get("event")
        last_event = rec
        t = rec.get("at") or rec.get("t")
        if ev == "session":
            sessions += 1
            run_id = str(rec.get("run_id") or run_id)
            lat = Lattice()  # a new session starts a fresh lattice
            lat.run(run_id).started = rec["t"]
            continue
        if ev in ("stage", "plan") and rec.get("run_id") and rec["run_id"] != run_id:
            old_run = lat.runs.pop(run_id, None)
            run_id = str(rec["run_id"])
            if old_run is not None:
                old_run.run_id = run_id
                lat.runs[run_id] = old_run
        r = lat.run(run_id)
        stage, index = rec.get("stage"), rec.get("index")
        try:
            _replay(lat, r, run_id, ev, rec, stage, index, t, run_dir)
        except (KeyError, TypeError, ValueError):  # a record of another emflow version
            continue
    now = None
    if last_event is not None and stopped:
        now = last_event.get("t")
        for r in lat.runs.values():
            for st in r.stages.values():
                for i in [i for i in st.cells if chr(st.codes[i]) in "qr"]:
                    lat.lose(r.run_id, st.name, i, worker=None, reason="driver stopped", when=now)
    snap = lat.snapshot(now=now)
    snap["sessions"] = sessions
    snap["last_event"] = last_event
    return snap


def _replay(
    lat: Lattice,
    r: Any,
    run_id: str,
    ev: Any,
    rec: dict[str, Any],
    stage: Any,
    index: Any,
    t: Any,
    run_dir: Path,
) -> None:
    """Apply one journal record to the lattice being rebuilt."""
    if ev == "plan":
        lat.plan(run_id, rec["stages"], run_dir=str(run_dir))
    elif ev == "stage":
        lat.begin_stage(
            run_id, stage, int(rec["total"]), redo=rec.get("redo") or (), run_dir=str(run_dir)
        )
    elif ev == "skipped":
        for i in rec.get("indices", []):
            lat.apply(run_id, stage, int(i), "skip")
    elif ev == "orphaned":
        for i in rec.get("indices", []):
            lat.apply(run_id, stage, int(i), "orphan")
    elif ev == "start":
        lat.apply(run_id, stage, int(index), "start", worker=rec.get("worker"), when=t)
    elif ev == "lost":
        lat.lose(
            run_id, stage, int(index), worker=rec.get("worker"), reason=rec.get("reason") or "lost",
            when=t,
        )  # fmt: skip
    elif ev == "done":
        st = r.stage(stage)
        i = int(index)
        if st.state(i) != R:
            lat.apply(
                run_id, stage, i, "start", worker=rec.get("worker"), when=rec.get("start") or t
            )
        if i in st.cells:
            st.cells[i].attempts = max(st.cells[i].attempts, int(rec.get("attempts") or 1))
        lat.apply(run_id, stage, i, "finish", worker=rec.get("worker"), when=rec.get("end", t))
    elif ev == "failed":
        st = r.stage(stage)
        i = int(index)
        if st.state(i) != R:
            lat.apply(run_id, stage, i, "start", worker=rec.get("worker"), when=t)
        lat.apply(
            run_id, stage, i, "fail", worker=rec.get("worker"), error=rec.get("error"), when=t
        )
        st.cells[i].attempts = int(rec.get("attempts", st.cells[i].attempts))
    elif ev == "pause":
        r.set_paused(True, now=t)
    elif ev == "resume":
        r.set_paused(False, now=t)
    elif ev == "cancel":
        r.cancelled = True


# --------------------------------------------------------------------------- sessions

_SESSIONS: dict[str, str] = {}  # resolved run folder -> journal session id (this process)
# resolved run folder -> stage -> units an earlier driver started (or failed) but never finished
_EARLIER: dict[str, dict[str, set[int]]] = {}


def session_id(run_dir: Path) -> str:
    """Journal session of ``run_dir`` in this process (one is started if there is none)."""
    return _SESSIONS.get(str(Path(run_dir).resolve())) or start_session(run_dir)


def earlier_attempts(run_dir: Path | None, stage: str) -> set[int]:
    """Units of ``stage`` that earlier sessions started or failed but never finished.

    When this session runs them they are *redone* (the lost attempt is counted).
    """
    if run_dir is None:
        return set()
    return _EARLIER.get(str(Path(run_dir).resolve()), {}).get(stage, set())


def start_session(run_dir: Path, *, resumed: bool | None = None) -> str:
    """Begin a journal session: append a ``session`` record, then reconcile the markers.

    Every marker without a ``done`` record in the journal (its unit finished
    after the previous driver stopped writing) gets one (``recovered``), so
    the journal's done units equal the markers. Every unit an earlier driver
    started that has neither a marker nor an outcome gets a ``lost`` record
    (reason ``driver stopped``): it was in flight when that driver died.
    :func:`open_run` calls this.
    """
    run_dir = Path(run_dir)
    sid = uuid.uuid4().hex[:12]
    key = str(run_dir.resolve())
    _SESSIONS[key] = sid
    journaled: set[tuple[str, int]] = set()
    last: dict[tuple[str, int], dict[str, Any]] = {}  # last start/failed/lost of unfinished units
    for rec in read_journal(run_dir):
        ev = rec.get("event")
        if ev not in ("done", "start", "failed", "lost") or "index" not in rec:
            continue
        unit = (str(rec.get("stage")), int(rec.get("index", -1)))
        if ev == "done":
            journaled.add(unit)
            last.pop(unit, None)
        else:
            last[unit] = rec
    markers = run_dir / MARKERS
    marked: dict[str, dict[int, dict[str, Any]]] = {}
    if markers.is_dir():
        for stage_dir in sorted(p for p in markers.iterdir() if p.is_dir()):
            marked[stage_dir.name] = done_markers(run_dir, stage_dir.name)
    earlier: dict[str, set[int]] = {}
    with Journal(run_dir) as j:
        j.append("session", session=sid, resumed=resumed, pid=os.getpid())
        for stage, done in marked.items():
            for index, payload in sorted(done.items()):
                if (stage, index) not in journaled:
                    j.append(
                        "done",
                        session=sid,
                        stage=stage,
                        index=index,
                        recovered=True,
                        worker=payload.get("worker"),
                        start=payload.get("start"),
                        end=payload.get("end"),
                    )
        for (stage, index), rec in sorted(last.items()):
            if index in marked.get(stage, {}):
                continue
            earlier.setdefault(stage, set()).add(index)
            if rec.get("event") == "start":
                j.append(
                    "lost", session=sid, stage=stage, index=index, worker=rec.get("worker"),
                    reason="driver stopped",
                )  # fmt: skip
    _EARLIER[key] = earlier
    return sid


def journal_done(run_dir: Path) -> set[tuple[str, int]]:
    """``(stage, index)`` of every unit the journal holds as done (any session)."""
    return {
        (str(rec["stage"]), int(rec["index"]))
        for rec in read_journal(run_dir)
        if rec.get("event") == "done" and "stage" in rec and "index" in rec
    }
