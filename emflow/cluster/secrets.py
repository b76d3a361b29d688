"""The run folder's ``secrets`` folder: temporary TLS certificates, owner-only, never left behind.

A TLS run (the default on shared clusters) has in-memory temporary certificates that
two kinds of files must carry: the worker jobs' copies (dask-jobqueue writes them to
its ``shared_temp_directory``) and the client copies ``emflow status | pause | resume |
cancel`` use to reach the live scheduler. Both live in one folder, mode 0700, files
0600, claimed by the driver that wrote them (``owner.json``: pid, host, files kept
elsewhere, and the batch jobs it submitted). The driver removes them when it ends; when
it died instead (SIGKILL, node failure) the next driver's :func:`prepare` removes them,
and cancels the dead driver's worker jobs (they would wait for a scheduler that is
gone), before it writes its own. No Dask import: file operations and the batch
system's cancel command.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SECRETS = "secrets"  # the folder's name inside the run folder
OWNER = "owner.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def owner(folder: Path) -> dict[str, Any] | None:
    """The driver that claimed ``folder`` (``pid``, ``host``, ``files``), if any."""
    try:
        rec = json.loads((Path(folder) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def owner_alive(rec: dict[str, Any] | None) -> bool | None:
    """True/False when the owner's process runs/is gone on this host; None when unknowable."""
    if not rec or not isinstance(rec.get("pid"), int):
        return False
    if rec.get("host") != socket.gethostname():
        return None
    return _alive(rec["pid"])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable by its owner only (0600 from the start)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def prepare(folder: Path) -> Path:
    """Create (mode 0700) and claim ``folder`` for this process, clearing a dead driver's files.

    Files of a previous owner that is still running on this host are left alone (two
    drivers on one run folder; the run's own checks report that), as are those of an
    owner on another host that claimed the folder less than a day ago.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    rec = owner(folder)
    if _mine(rec):
        return folder  # ours already
    alive = owner_alive(rec)
    if rec is not None and (
        alive is True or (alive is None and time.time() - float(rec.get("t", 0)) < 86400)
    ):
        return folder  # another driver's, alive (or maybe alive elsewhere): not ours to clear
    clean(folder, rec)
    _claim(folder, [])
    return folder


def _mine(rec: dict[str, Any] | None) -> bool:
    return (
        rec is not None
        and rec.get("pid") == os.getpid()
        and rec.get("host") == socket.gethostname()
    )


def _claim(folder: Path, files: list[str], jobs: dict[str, Any] | None = None) -> None:
    _write_private(
        folder / OWNER,
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "t": time.time(),
                    "files": files, "jobs": jobs or {}}),
    )  # fmt: skip


def register(folder: Path, paths: Iterable[str | Path]) -> None:
    """Note secret files this driver keeps outside ``folder`` (a site's shared_temp_directory)."""
    rec = owner(folder) or {}
    files = sorted({*rec.get("files", []), *(str(Path(p).resolve()) for p in paths)})
    _claim(Path(folder), files, rec.get("jobs"))


def note_job(folder: Path, job_id: str, cancel_command: str) -> None:
    """Note a batch job this driver submitted (``{"cancel": command, "ids": [...]}``)."""
    rec = owner(folder) or {}
    jobs = dict(rec.get("jobs") or {})
    jobs["cancel"] = cancel_command
    jobs["ids"] = sorted({*jobs.get("ids", []), str(job_id)})
    _claim(Path(folder), list(rec.get("files", [])), jobs)


def write_pem(folder: Path, name: str, text: str) -> Path:
    """One certificate or key as a 0600 file in the (0700) folder."""
    path = Path(folder) / name
    _write_private(path, text)
    return path


def clean(folder: Path, rec: dict[str, Any] | None = None) -> None:
    """Remove every file of ``folder`` and the outside files its owner registered; cancel the
    batch jobs of an owner that is not this process (a dead driver's)."""
    folder = Path(folder)
    rec = owner(folder) if rec is None else rec
    jobs = (rec or {}).get("jobs") or {}
    if jobs.get("ids") and jobs.get("cancel") and not _mine(rec):  # a dead driver's jobs
        try:
            subprocess.run([*shlex.split(jobs["cancel"]), *jobs["ids"]], capture_output=True,
                           timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            pass  # best effort: they end by themselves once their death timeout passes
    for f in (rec or {}).get("files", []):
        with contextlib.suppress(OSError):
            Path(f).unlink()
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() or p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()


def release(folder: Path, names: Iterable[str] | None = None) -> None:
    """At the end of the driver that owns ``folder``: remove its secrets (nothing else's).

    ``names``: only these files of the folder (the client copies of one run), and the
    claim too once nothing else is left.
    """
    folder = Path(folder)
    rec = owner(folder)
    if not _mine(rec):
        return
    if names is None:
        clean(folder, rec)
        return
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    left = [p for p in folder.iterdir() if p.name != OWNER] if folder.is_dir() else []
    if not left and not (rec or {}).get("files"):
        with contextlib.suppress(OSError):
            (folder / OWNER).unlink()
