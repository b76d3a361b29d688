"""Which paths emflow may create, replace or delete: only those it can prove it created.

Every folder emflow makes in ``output_dir`` (the run folder and each output, also
while it is ``<name>.partial``) gets a marker file :data:`MARKER` written *first*,
before any data. The run folder's marker holds a random ``owner`` id, made once per
output_dir; each output's marker repeats it. A path counts as emflow's own only if
its marker carries the owner id of this output_dir's run folder, so a foreign
folder, a source folder or an output copied from another run is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from emflow.errors import OutputError

MARKER = ".emflow-output.json"


def read_marker(path: Path) -> dict | None:
    """The ownership marker inside folder ``path``, or None (absent, unreadable, or a symlink)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("owner"), str) else None


def owner_of(run_dir: Path) -> str | None:
    """The owner id of a run folder emflow made, or None if ``run_dir`` is not one."""
    data = read_marker(run_dir)
    return data["owner"] if data and data.get("kind") == "run-folder" else None


def is_owned(path: Path, owner: str | None) -> bool:
    """True if ``path`` is a folder emflow created for this output_dir (its marker names ``owner``)."""
    data = read_marker(path)
    return owner is not None and data is not None and data["owner"] == owner


def _write_marker(path: Path, payload: dict) -> None:
    tmp = path / f".{MARKER}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MARKER)


def claim_run_folder(run_dir: Path) -> str:
    """Create the run folder (with its marker, first) or return the owner id it already has.

    Raises
    ------
    OutputError
        ``run_dir`` exists but emflow did not make it (and it is not empty).
    """
    run_dir = Path(run_dir)
    owner = owner_of(run_dir)
    if owner is not None:
        return owner
    if os.path.lexists(run_dir) and not _empty_dir(run_dir):
        raise refused(run_dir, "is not emflow's run folder")
    owner = uuid.uuid4().hex
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(run_dir, {"kind": "run-folder", "owner": owner, "created": time.time()})
    return owner


def claim(path: Path, owner: str, name: str) -> None:
    """Make an empty output folder ``path`` whose marker (written first) names ``owner``.

    An existing folder is emptied only if it is owned; a foreign one raises OutputError.
    """
    path = Path(path)
    if os.path.lexists(path):
        if not is_owned(path, owner):
            raise refused(path, "was not written by emflow for this output_dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    _write_marker(path, {"kind": "output", "owner": owner, "name": name})


def remove(path: Path, owner: str) -> None:
    """Delete an output folder emflow owns; refuse anything else."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not is_owned(path, owner):
        raise refused(path, "was not written by emflow for this output_dir")
    shutil.rmtree(path)


def replace(partial: Path, final: Path, owner: str) -> None:
    """Move a finished ``<name>.partial`` onto ``<name>``, replacing only an owned earlier output."""
    if not is_owned(partial, owner):
        raise refused(partial, "was not written by emflow for this output_dir")
    remove(final, owner)
    Path(partial).rename(final)


def refused(path: Path, why: str) -> OutputError:
    """The one-line refusal for a path emflow will not touch."""
    return OutputError(
        f"{path} already exists and {why}; emflow replaces only what it wrote: move it away, "
        "or choose another output name or output_dir"
    )


def _empty_dir(path: Path) -> bool:
    try:
        return Path(path).is_dir() and not Path(path).is_symlink() and not any(os.scandir(path))
    except OSError:
        return False
