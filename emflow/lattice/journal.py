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
        self._fh.write(json.dumps(rec, separators=(",", ":"), default=str) + "\n")
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


def summarize_journal(run_dir: Path) -> dict[str, Any]:
    """Replay the journal into a lattice snapshot (same shape as :meth:`Lattice.snapshot`).

    Used by ``emflow status`` when no run is live. The last session's view is
    shown: units done in earlier sessions count as skipped when the last
    session skipped them, as done otherwise.
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
        if ev == "session":
            sessions += 1
            run_id = str(rec.get("run_id") or run_id)
            lat = Lattice()  # a new session starts a fresh lattice
            lat.run(run_id).started = rec["t"]
            continue
        if ev == "stage" and rec.get("run_id") and rec["run_id"] != run_id:
            old_run = lat.runs.pop(run_id, None)
            run_id = str(rec["run_id"])
            if old_run is not None:
                old_run.run_id = run_id
                lat.runs[run_id] = old_run
        r = lat.run(run_id)
        stage, index, t = rec.get("stage"), rec.get("index"), rec.get("t")
        if ev == "stage":
            lat.begin_stage(run_id, stage, int(rec["total"]), run_dir=str(run_dir))
        elif ev == "skipped":
            for i in rec.get("indices", []):
                lat.apply(run_id, stage, int(i), "skip")
        elif ev == "orphaned":
            for i in rec.get("indices", []):
                lat.apply(run_id, stage, int(i), "orphan")
        elif ev == "start":
            lat.apply(run_id, stage, int(index), "start", worker=rec.get("worker"), when=t)
        elif ev == "done":
            cell_start = rec.get("start")
            if lat.run(run_id).stage(stage).state(int(index)) != R and cell_start:
                lat.apply(
                    run_id, stage, int(index), "start", worker=rec.get("worker"), when=cell_start
                )
            lat.apply(
                run_id,
                stage,
                int(index),
                "finish",
                worker=rec.get("worker"),
                when=rec.get("end", t),
            )
        elif ev == "failed":
            st = r.stage(stage)
            if st.state(int(index)) != R:
                lat.apply(run_id, stage, int(index), "start", worker=rec.get("worker"), when=t)
            lat.apply(
                run_id,
                stage,
                int(index),
                "fail",
                worker=rec.get("worker"),
                error=rec.get("error"),
                when=t,
            )
            st.cells[int(index)].attempts = int(rec.get("attempts", st.cells[int(index)].attempts))
        elif ev == "pause":
            r.paused = True
        elif ev == "resume":
            r.paused = False
        elif ev == "cancel":
            r.cancelled = True
    snap = lat.snapshot()
    snap["sessions"] = sessions
    snap["last_event"] = last_event
    return snap


# --------------------------------------------------------------------------- sessions

_SESSIONS: dict[str, str] = {}  # resolved run folder -> journal session id (this process)


def session_id(run_dir: Path) -> str:
    """Journal session of ``run_dir`` in this process (one is started if there is none)."""
    return _SESSIONS.get(str(Path(run_dir).resolve())) or start_session(run_dir)


def start_session(run_dir: Path, *, resumed: bool | None = None) -> str:
    """Begin a journal session: append a ``session`` record, then reconcile the markers.

    Every marker without a ``done`` record in the journal (its unit finished
    after the previous driver stopped writing) gets one (``recovered``), so
    the journal's done units equal the markers. :func:`open_run` calls this.
    """
    run_dir = Path(run_dir)
    sid = uuid.uuid4().hex[:12]
    _SESSIONS[str(run_dir.resolve())] = sid
    journaled: set[tuple[str, int]] = set()
    for rec in read_journal(run_dir):
        if rec.get("event") == "done":
            journaled.add((str(rec.get("stage")), int(rec.get("index", -1))))
    with Journal(run_dir) as j:
        j.append("session", session=sid, resumed=resumed, pid=os.getpid())
        markers = run_dir / MARKERS
        if markers.is_dir():
            for stage_dir in sorted(p for p in markers.iterdir() if p.is_dir()):
                for index, payload in sorted(done_markers(run_dir, stage_dir.name).items()):
                    if (stage_dir.name, index) not in journaled:
                        j.append(
                            "done",
                            session=sid,
                            stage=stage_dir.name,
                            index=index,
                            recovered=True,
                            worker=payload.get("worker"),
                            start=payload.get("start"),
                            end=payload.get("end"),
                        )
    return sid


def journal_done(run_dir: Path) -> set[tuple[str, int]]:
    """``(stage, index)`` of every unit the journal holds as done (any session)."""
    return {
        (str(rec["stage"]), int(rec["index"]))
        for rec in read_journal(run_dir)
        if rec.get("event") == "done" and "stage" in rec and "index" in rec
    }
