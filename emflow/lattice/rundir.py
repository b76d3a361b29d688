"""The run folder's lifecycle: :func:`open_run` (resume, restart, fingerprint check), live-run file.

:func:`write_scheduler_file` / :func:`read_scheduler_file` record the scheduler of the
live run for ``emflow status/pause/resume/cancel``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emflow.errors import OutputError
from emflow.lattice.journal import JOURNAL, start_session
from emflow.lattice.markers import MARKERS, RUN_JSON, SCHEDULER_JSON, read_marker, write_marker


def open_run(run_dir: Path, fingerprint: str, *, restart: bool) -> bool:
    """Prepare the run folder; return True when an earlier run of the same recipe is resumed.

    With ``restart`` every marker, the journal and the live-run file are
    removed first, so nothing is skipped.

    Raises
    ------
    OutputError
        The folder holds a run of a recipe with another fingerprint (output
        would differ) and ``restart`` is False.
    """
    run_dir = Path(run_dir)
    run_json = run_dir / RUN_JSON
    if run_json.exists() and not restart:
        try:
            old = json.loads(run_json.read_text()).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            raise OutputError(
                f"{run_dir} holds a run of a different recipe "
                f"(fingerprint {old} != {fingerprint}), "
                "so it cannot be resumed; use --restart to redo everything, "
                "or choose another output_dir"
            )
        start_session(run_dir, resumed=True)
        return True
    if restart:
        for name in (MARKERS,):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in (JOURNAL, SCHEDULER_JSON, RUN_JSON):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_json, {"fingerprint": fingerprint, "created": time.time(), "result": None})
    except OSError as exc:
        raise OutputError(
            f"cannot write the run folder {run_dir} ({exc}); check permissions"
        ) from exc
    start_session(run_dir, resumed=False)
    return False


def write_scheduler_file(
    run_dir: Path, *, address: str, dashboard: str | None, run_id: str
) -> None:
    """Record the live run's scheduler so ``emflow status/pause/resume/cancel`` can reach it."""
    write_marker(
        Path(run_dir) / SCHEDULER_JSON,
        {
            "address": address,
            "dashboard": dashboard,
            "run_id": run_id,
            "pid": os.getpid(),
            "started": time.time(),
            "result": None,
        },
    )


def read_scheduler_file(run_dir: Path) -> dict[str, Any] | None:
    """The live-run record written by :func:`write_scheduler_file`, if any."""
    return read_marker(Path(run_dir) / SCHEDULER_JSON)


@contextlib.contextmanager
def live_run(run_dir: Path, *, timeout: float = 3.0) -> Iterator[tuple[Any, dict[str, Any]] | None]:
    """Yield ``(client, scheduler record)`` of the live run of ``run_dir``; None if none is live."""
    info = read_scheduler_file(run_dir)
    complete = run_dir / "COMPLETE"
    sched = run_dir / SCHEDULER_JSON
    if not info or not info.get("address"):
        yield None
        return
    if complete.exists() and complete.stat().st_mtime >= sched.stat().st_mtime:
        yield None  # the run recorded there has finished
        return
    from distributed import Client

    try:
        client = Client(info["address"], timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError):
        yield None
        return
    try:
        yield client, info
    finally:
        client.close()
