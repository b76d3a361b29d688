"""`emflow status | pause | resume | cancel` on every run: a live TLS run is reached with the run
folder's own credentials (owner-only files), a plain run without; a dead, stopped or unreachable
run is shown from its journal with the reason, exit 0. Temporary certificates are removed when
the driver ends, and by the next driver when it died."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from emflow import lattice as lat
from emflow.cli import main as cli_main
from emflow.cluster import secrets
from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.test_kill_matrix import RECIPE, cli, journal, sessions, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("control")
    write_stack(synthetic_slices((16, 192, 192), seed=3), root / "src")
    (root / "tls.yaml").write_text("processes: false\nsecurity: true\n")
    return root


def emflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return clirun.emflow(*args, cwd=cwd, timeout=120)


def start_held(stack: Path, tmp_path: Path, hold: str) -> tuple[subprocess.Popen, Path]:
    """An `emflow run` on a TLS local cluster, held (paused) at ``hold``."""
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=stack / "src"))
    run_dir = tmp_path / "out" / "emflow-run"
    proc = cli(
        ["run", "recipe.yaml", "--workers", "1", "--threads", "2", "--dashboard", ":0", "-q",
         "--cluster-config", str(stack / "tls.yaml")],
        tmp_path, env={"EMFLOW_PAUSE_AFTER": hold},
    )  # fmt: skip
    stage = hold.split(":")[0]
    wait_for(
        lambda: any(r["event"] == "pause" and r.get("stage") == stage for r in journal(run_dir)),
        proc,
        f"the run held at {hold}",
    )
    return proc, run_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_control_commands_on_a_live_tls_run_then_on_the_stopped_run(stack, tmp_path):
    proc, run_dir = start_held(stack, tmp_path, "slab:1")
    try:
        info = lat.read_scheduler_file(run_dir)
        assert info["address"].startswith("tls://") and info["pid"] == proc.pid
        folder = run_dir / "secrets"
        assert mode(folder) == 0o700
        pems = sorted(folder.glob("client-*.pem"))
        assert [p.name for p in pems] == ["client-ca.pem", "client-cert.pem", "client-key.pem"]
        assert all(mode(p) == 0o600 for p in pems)
        assert set(info["tls"].values()) == {f"secrets/{p.name}" for p in pems}

        live = emflow("status", "out", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
        assert f"(live, scheduler {info['address']}" in live.stdout
        assert "paused stages: slab" in live.stdout
        rows = {ln.split()[0]: ln.split()[1:] for ln in live.stdout.splitlines()[2:]}
        assert rows["features"][:5] == ["16", "0", "0", "0", "16"]  # done, live from the lattice
        assert rows["slab"][0] == "4" and rows["finalize"][0] == "~2"  # planned from the start

        paused = emflow("pause", "out", cwd=tmp_path)
        assert paused.returncode == 0 and "paused run" in paused.stdout, paused.stderr
        resumed = emflow("resume", "out", "--stage", "slab", cwd=tmp_path)
        assert resumed.returncode == 0 and "resumed stage slab" in resumed.stdout
        flags = emflow("status", "out", cwd=tmp_path).stdout.splitlines()[0]
        assert flags.endswith("PAUSED"), flags  # the run is paused; its slab stage no more
        cancel = emflow("cancel", "out", cwd=tmp_path)
        assert cancel.returncode == 0 and "cancel requested" in cancel.stdout, cancel.stderr
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, err
    assert not list(folder.glob("client-*.pem")), "the driver removes its client credentials"
    events = [r["event"] for r in journal(run_dir)]
    assert {"pause_request", "resume_request", "cancel_request", "cancel"} <= set(events)

    for cmd in ("status", "pause", "cancel"):
        res = emflow(cmd, "out", cwd=tmp_path)
        assert res.returncode == 0, (cmd, res.stderr)
        assert "the run is not live: the run stopped at" in res.stderr, (cmd, res.stderr)
        assert "slab" in res.stdout and "(journal)" in res.stdout  # the journal's view
    again = cli(["run", "recipe.yaml", "--workers", "1", "--threads", "2", "--dashboard", ":0",
                 "-q", "--cluster-config", str(stack / "tls.yaml")], tmp_path)  # fmt: skip
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    done = emflow("status", "out", "--json", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["source"] == "journal, run complete"


def test_a_killed_tls_run_is_shown_from_its_journal_and_its_certificates_cleared(stack, tmp_path):
    proc, run_dir = start_held(stack, tmp_path, "match:5")
    old = {p.name: p.read_text() for p in (run_dir / "secrets").glob("client-*.pem")}
    assert len(old) == 3
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(old) == sorted(p.name for p in (run_dir / "secrets").glob("client-*.pem"))

    status = emflow("status", "out", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"its driver (pid {proc.pid} on {socket.gethostname()}) is not running" in status.stderr
    snap = json.loads(status.stdout)
    assert snap["live"] is False and snap["source"] == "journal"
    stages = {s["stage"]: s for s in snap["runs"][0]["stages"]}
    assert stages["features"]["counts"]["done"] == 16
    m = stages["match"]["counts"]
    assert m["done"] + m["waiting"] == 15 and m["running"] == 0 and m["queued"] == 0
    assert stages["slab"]["total"] == 4 and stages["slab"]["planned"] is True
    for cmd in ("pause", "resume", "cancel"):
        res = emflow(cmd, "out", cwd=tmp_path)
        assert res.returncode == 0 and f"cannot {cmd}: the run is not live" in res.stderr, res

    again = cli(["run", "recipe.yaml", "--workers", "1", "--threads", "2", "--dashboard", ":0",
                 "-q", "--cluster-config", str(stack / "tls.yaml")], tmp_path,
                env={"EMFLOW_PAUSE_AFTER": "slab:0"})  # fmt: skip
    try:
        wait_for(
            lambda: (
                (lat.read_scheduler_file(run_dir) or {}).get("pid") == again.pid
                and any(r["event"] == "pause" for r in sessions(run_dir)[-1])
            ),
            again,
            "the new driver, held at slab",
        )
        new = {p.name: p.read_text() for p in (run_dir / "secrets").glob("client-*.pem")}
        assert sorted(new) == sorted(old) and all(new[k] != old[k] for k in old)
        assert secrets.owner(run_dir / "secrets")["pid"] == again.pid
        assert emflow("resume", "out", cwd=tmp_path).returncode == 0
        _out, err = again.communicate(timeout=300)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait()
    assert again.returncode == 0, err
    assert not list((run_dir / "secrets").iterdir())


def test_unreachable_scheduler_and_a_run_never_started(tmp_path, capsys):
    """A recorded scheduler that does not answer (its driver alive, e.g. on a network split), and
    a run folder with no live-run record: status says why, shows the journal, exits 0."""
    run_dir = tmp_path / "emflow-run"
    lat.open_run(run_dir, "fp", restart=False)
    with lat.Journal(run_dir) as j:
        j.append("stage", stage="slab", run_id="fp", total=3)
        j.append("done", stage="slab", index=0, attempts=1, start=1.0, end=2.0, worker="w")
    assert cli_main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "not live: no live run was recorded" in out.err and "slab" in out.out
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lat.write_scheduler_file(
        run_dir, address=f"tcp://127.0.0.1:{port}", dashboard=None, run_id="fp"
    )  # pid: this (alive) process
    assert cli_main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"its scheduler tcp://127.0.0.1:{port} is not reachable" in out.err
    assert "Traceback" not in out.err
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.out.splitlines()[2:]}
    assert lines["slab"][:5] == ["3", "2", "0", "0", "1"]
    assert cli_main(["cancel", str(tmp_path)]) == 0
    assert "cannot cancel: the run is not live" in capsys.readouterr().err
