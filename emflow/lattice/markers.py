"""Atomic JSON marker files of a run folder: done markers, ``run.json``, ``scheduler.json``.

A marker is written atomically (tmp + fsync + rename + fsync of the folder) and read
back only when it holds a ``result`` key; ``done/<stage>/<index>.json`` markers are
the durable truth for resume.
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


def write_marker(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write a JSON marker: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's payload, or None when absent or unreadable (then the unit is redone)."""
    try:
        payload = json.loads(Path(path).read_text())
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
