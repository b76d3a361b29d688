"""JSON marker files of a run folder: done markers, ``run.json``, ``scheduler.json``.

A marker is read back only when it parses and holds a ``result`` key;
``done/<stage>/<index>.json`` markers are the truth for resume. Run-folder records
(``run.json``, ``outputs.json``...) are written atomically and durably (tmp + fsync + rename +
fsync of the folder). Done markers are written in place without fsync -- per unit, that
would cost more than a no-op unit: their unit's output is already durable (tensorstore
fsyncs it before the unit returns), and a marker a crash drops, empties or tears reads as
absent, so the unit runs again (units are idempotent). The driver may create a batch's markers
empty before its units run (:func:`reserve_markers`): until written they read as absent too.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

RUN_JSON = "run.json"
SCHEDULER_JSON = "scheduler.json"
OUTPUTS_JSON = "outputs.json"  # the volumes created under the current plan (emflow.resume)
MARKERS = "done"


def marker_path(run_dir: Path, stage: str, index: int) -> Path:
    """Done marker of one unit: ``run_dir/done/<stage>/<index>.json``."""
    return Path(run_dir) / MARKERS / stage / f"{index}.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_marker(path: Path, payload: dict[str, Any], *, durable: bool = True) -> None:
    """Write a JSON marker that reads back whole or not at all.

    ``durable`` (run-folder records): temporary file, fsync, rename over ``path``, fsync of
    the folder. Otherwise (done markers, one per unit): written in place, no fsync, no
    rename -- a crash or a second writer can leave it torn or empty, which
    :func:`read_marker` reads as absent (a JSON object parses only once complete), so its
    unit runs again; it never reads as done without its output.
    """
    path = Path(path)
    data = json.dumps(payload, separators=(",", ":")).encode()
    target = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp") if durable else path
    fd = -1
    if not durable:  # a done marker reserved by reserve_markers is opened without O_CREAT:
        with contextlib.suppress(FileNotFoundError):  # no lock on the folder, which workers
            fd = os.open(target, os.O_WRONLY | os.O_TRUNC)  # creating files in it contend for
    if fd < 0:
        fd = _create(target, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if durable else os.O_TRUNC))
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            os.replace(target, path)
    except BaseException:
        if durable:
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise
    if durable:
        _fsync_dir(path.parent)


def reserve_markers(paths: list[str]) -> None:
    """Create the done markers ``paths`` empty where absent (an empty marker reads as absent).

    The driver reserves the markers of the units it submits together in a batch task: each
    worker then writes its markers into files that exist. Creating files in one folder from
    several processes at once costs each creator about 0.6 ms of CPU per file in lock contention
    on that folder (2 workers, 2 cores; 0.05 ms when one process creates them all), more than a
    no-op unit's whole cost.
    """
    for p in paths:
        os.close(_create(p, os.O_WRONLY | os.O_CREAT))  # no O_TRUNC: a written marker stays


def _create(path: str | Path, flags: int) -> int:
    """``os.open(path, flags)`` (flags with O_CREAT), making the folder when it is missing."""
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o644)


def sync_markers(run_dir: Path, stage: str) -> None:
    """fsync the folder of a stage's done markers (once per stage, by the driver)."""
    folder = Path(run_dir) / MARKERS / stage
    if folder.is_dir():
        _fsync_dir(folder)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's payload, or None when absent, empty, torn or not a marker (then the unit
    is redone)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        payload = json.loads(data) if data else None  # empty: reserved, not written yet
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and "result" in payload else None


def done_markers(run_dir: Path, stage: str) -> dict[int, dict[str, Any]]:
    """``{index: marker payload}`` of every unit of ``stage`` durably done (one directory scan)."""
    folder = Path(run_dir) / MARKERS / stage
    out: dict[int, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    for e in entries:
        name = e.name
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            index = int(name[:-5])
        except ValueError:
            continue
        payload = read_marker(Path(e.path))
        if payload is not None:
            out[index] = payload
    return out
