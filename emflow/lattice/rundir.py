"""The run folder's lifecycle: :func:`open_run` (resume, restart, fingerprint check), live-run file.

:func:`write_scheduler_file` / :func:`read_scheduler_file` record the scheduler of the
live run for ``emflow status/pause/resume/cancel``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emflow.errors import OutputError
from emflow.lattice.journal import JOURNAL, start_session
from emflow.lattice.markers import (
    MARKERS,
    OUTPUTS_JSON,
    RUN_JSON,
    SCHEDULER_JSON,
    read_marker,
    write_marker,
)


def open_run(run_dir: Path, fingerprint: str, *, restart: bool) -> bool:
    """Prepare the run folder; return True when an earlier run of the same recipe is resumed.

    With ``restart`` every marker, the journal, the live-run file and the record
    of created volumes are removed first, so nothing is skipped or reused.

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
        for name in (JOURNAL, SCHEDULER_JSON, RUN_JSON, OUTPUTS_JSON):
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


CLIENT_PEMS = {"ca_file": "client-ca.pem", "cert": "client-cert.pem", "key": "client-key.pem"}


def write_scheduler_file(
    run_dir: Path,
    *,
    address: str,
    dashboard: str | None,
    run_id: str,
    tls: dict[str, str] | None = None,
    session: str | None = None,
) -> None:
    """Record the live run's scheduler so ``emflow status/pause/resume/cancel`` can reach it.

    ``tls`` holds the client's ``ca_file``, ``cert`` and ``key`` paths (relative to the
    run folder when they are its own temporary copies in ``secrets/``).
    """
    write_marker(
        Path(run_dir) / SCHEDULER_JSON,
        {
            "address": address,
            "dashboard": dashboard,
            "run_id": run_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "session": session,
            "started": time.time(),
            "tls": tls,
            "result": None,
        },
    )


def read_scheduler_file(run_dir: Path) -> dict[str, Any] | None:
    """The live-run record written by :func:`write_scheduler_file`, if any."""
    return read_marker(Path(run_dir) / SCHEDULER_JSON)


def announce_run(client: Any, run_dir: Path, run_id: str) -> None:
    """Record how to reach this run's scheduler, with the client credentials it needs.

    On a TLS scheduler whose certificates exist only in memory (temporary ones, as on
    SLURM and Kubernetes) the client's CA, certificate and key are written to the run
    folder's ``secrets/`` (0700, files 0600); certificate *files* the user configured
    are recorded by path. :func:`retire_run` removes the copies when the run ends.
    """
    from emflow.cluster import secrets

    run_dir = Path(run_dir)
    address = str(client.scheduler.address)
    tls = None
    if address.startswith("tls://"):
        cfg = client.security.get_tls_config_for_role("client")
        tls = {}
        folder = None
        for field, name in CLIENT_PEMS.items():
            value = cfg.get(field)
            if not value:
                continue
            if "\n" in value:  # in-memory PEM
                folder = folder or secrets.prepare(run_dir / secrets.SECRETS)
                tls[field] = str(secrets.write_pem(folder, name, value).relative_to(run_dir))
            else:
                tls[field] = str(Path(value).resolve())
    try:
        from emflow.dashboard import dashboard_url

        dash = dashboard_url(client)
    except Exception:
        dash = None
    from emflow.lattice.journal import session_id

    write_scheduler_file(
        run_dir, address=address, dashboard=dash, run_id=run_id, tls=tls,
        session=session_id(run_dir),
    )  # fmt: skip


def retire_run(run_dir: Path) -> None:
    """The driver ends (done, failed or cancelled): drop the client credentials, note the end."""
    from emflow.cluster import secrets

    run_dir = Path(run_dir)
    info = read_scheduler_file(run_dir)
    if info is not None and info.get("pid") == os.getpid() and not info.get("ended"):
        with contextlib.suppress(OSError):
            write_marker(run_dir / SCHEDULER_JSON, {**info, "ended": time.time()})
    secrets.release(run_dir / secrets.SECRETS, CLIENT_PEMS.values())


@dataclass
class RunContact:
    """The outcome of reaching a run's scheduler: a client, or why there is none.

    ``stopped`` is True when the driver is known to be gone (finished, ended, or its
    process no longer runs on this host), False when it may still run but cannot be
    reached.
    """

    client: Any
    info: dict[str, Any] | None
    reason: str
    stopped: bool


def _security(run_dir: Path, info: dict[str, Any]) -> Any:
    from distributed.security import Security

    tls = info.get("tls") or {}
    paths = {k: str(run_dir / v) if not Path(v).is_absolute() else v for k, v in tls.items()}
    for p in paths.values():
        with open(p):  # unreadable: say so before a TLS handshake error would
            pass
    return Security(
        tls_ca_file=paths.get("ca_file"),
        tls_client_cert=paths.get("cert"),
        tls_client_key=paths.get("key"),
        require_encryption=True,
    )


@contextlib.contextmanager
def connect_run(run_dir: Path, *, timeout: float = 5.0) -> Iterator[RunContact]:
    """Reach the scheduler of ``run_dir``'s live run with the run's own credentials.

    Never raises for a dead or unreachable run: the contact's ``client`` is None and its
    ``reason`` says why.
    """
    run_dir = Path(run_dir)
    info = read_scheduler_file(run_dir)
    sched = run_dir / SCHEDULER_JSON
    complete = run_dir / "COMPLETE"
    if not info or not info.get("address"):
        yield RunContact(None, info, "no live run was recorded in this run folder", True)
        return
    if complete.exists() and complete.stat().st_mtime >= sched.stat().st_mtime:
        yield RunContact(None, info, "the run has finished", True)
        return
    if info.get("ended"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["ended"]))
        yield RunContact(None, info, f"the run stopped at {when}", True)
        return
    pid, host = info.get("pid"), info.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        yield RunContact(
            None, info, f"its driver (pid {pid} on {host}) is not running any more", True
        )
        return
    address = str(info["address"])
    security = None
    if address.startswith("tls://"):
        if not info.get("tls"):
            yield RunContact(None, info, f"no client credentials recorded for {address}", False)
            return
        try:
            security = _security(run_dir, info)
        except OSError as exc:
            yield RunContact(
                None, info,
                f"cannot read the run's credentials ({exc.strerror}: {exc.filename}); "
                "only the user who started the run can reach it", False,
            )  # fmt: skip
            return
    client, reason = _client(address, security, timeout)
    if client is None:
        yield RunContact(None, info, reason, False)
        return
    try:
        yield RunContact(client, info, "live", False)
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _client(address: str, security: Any, timeout: float) -> tuple[Any, str]:
    """A Client of ``address``, or None and one line saying why not (no library log noise)."""
    import gc
    import logging

    from distributed import Client

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:  # a refused port answers at once; Client would retry it until its timeout
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        return None, f"its scheduler {address} is not reachable ({exc.strerror or exc})"
    quiet = [logging.getLogger(n) for n in ("distributed", "distributed.client", "tornado")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    failure = None
    try:
        return Client(
            address, security=security, timeout=f"{timeout}s", set_as_default=False
        ), "live"
    except Exception as exc:  # refused, timed out, TLS handshake: all mean "not reachable"
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        failure = f"its scheduler {address} is not reachable ({text})"
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    gc.collect()  # a failed Client closes itself in __del__: not during a later Client's start
    return None, failure


@contextlib.contextmanager
def live_run(run_dir: Path, *, timeout: float = 5.0) -> Iterator[tuple[Any, dict[str, Any]] | None]:
    """Yield ``(client, scheduler record)`` of the live run of ``run_dir``; None if none is live."""
    with connect_run(run_dir, timeout=timeout) as contact:
        yield None if contact.client is None else (contact.client, contact.info or {})
