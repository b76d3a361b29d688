"""Resume and control on the real single-node SLURM, over TLS (``bash .ci/slurm.sh`` starts it).

* `emflow status | pause | resume` on a TLS SLURM run in progress (the run folder's own
  credentials) and on the same run after its driver was SIGKILLed (journal view, exit 0);
* the kill matrix on SLURM: the driver SIGKILLed in every stage, one run after the other, each
  rerun skipping exactly the units with markers; Ctrl-C (SIGINT) in a stage; a worker killed in
  every stage; every run's output byte-identical to an uninterrupted local run's;
* a dead driver's leftovers: its worker jobs are cancelled and its temporary certificates
  removed by the next driver, before that one starts its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from emflow import lattice as lat
from emflow.cluster import secrets
from tests import clirun
from tests.conftest import slurm_unavailable
from tests.test_kill_matrix import (
    HOLD,
    OUTPUTS,
    RECIPE,
    STAGES,
    assert_identical,
    assert_lost_and_redone,
    assert_resumed,
    cli,
    command,
    markers,
    run_with_worker_kills,
    sessions,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


_why = slurm_unavailable()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

JOB_NAME = f"emflow-r{uuid.uuid4().hex[:6]}"  # unique: these tests see and cancel only theirs


# Jobs that wait or run. A cancelled job is listed as COMPLETING (CG) until slurmd has killed
# its processes (seconds on a busy node, up to KillWait): it is gone for the user, not live.
LIVE = "PD,CF,R,S"


def our_jobs(states: str = LIVE) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-t", states, "-o", "%i"],
                          capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    return proc.stdout.split()


def assert_no_jobs_left(timeout: float = 30.0) -> None:
    """None of this module's jobs waits or runs (slurmctld may take a moment to note a cancel)."""
    deadline = time.monotonic() + timeout
    while our_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-t", "all", "-o", "%i %T %r"],
                          capture_output=True, text=True, timeout=20).stdout  # fmt: skip
    assert our_jobs() == [], f"worker jobs outlived the driver:\n{left}"


@pytest.fixture(autouse=True)
def cancel_leftovers():
    """A failed test may leave worker jobs behind: cancel them (the tests assert on jobs)."""
    yield
    left = our_jobs("all")
    if left:
        subprocess.run(["scancel", *left], timeout=30, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    from emflow.testing import synthetic_slices, write_stack

    root = tmp_path_factory.mktemp("slurm-resume")
    write_stack(synthetic_slices((16, 192, 192), seed=3), root / "src")
    (root / "threads.yaml").write_text("processes: false\n")
    (root / "slurm.yaml").write_text(
        "queue: debug\n"
        "interface: lo\n"  # the single node's workers reach the scheduler on loopback
        "cores: 1\n"
        "memory: 1GiB\n"
        'walltime: "00:10:00"\n'
        "death_timeout: 300\n"  # a dead driver's jobs stay until someone cancels them
        f"job_name: {JOB_NAME}\n"
    )
    return root


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> dict[str, dict[str, str]]:
    from tests.conftest import tree_digest

    work = tmp_path_factory.mktemp("reference")
    (work / "recipe.yaml").write_text(RECIPE.format(src=stack / "src"))
    proc = cli(command(stack, processes=False), work)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return {name: tree_digest(work / "out" / name) for name in OUTPUTS}


def slurm_run(stack: Path) -> list[str]:
    return ["run", "recipe.yaml", "--cluster", "slurm", "--cluster-config",
            str(stack / "slurm.yaml"), "--workers", "2", "--max-workers", "2",
            "--dashboard", ":0", "-q"]  # fmt: skip


def assert_resumed_on_slurm(run_dir: Path, before: dict[str, set[int]], killed: list[dict]):
    """Like :func:`assert_resumed`, knowing that a SIGKILLed driver's SLURM jobs live on: a unit
    they were running may finish (and be skipped) after the markers were listed at the kill,
    and the dead driver may not have journaled the start of a unit it had just released."""
    last = sessions(run_dir)[-1]
    skipped = {s: set() for s in STAGES}
    for r in last:
        if r["event"] == "skipped":
            skipped[r["stage"]] |= set(r["indices"])
    started = {(r["stage"], r["index"]) for r in killed if r["event"] == "start"}
    for s in STAGES:
        assert before[s] <= skipped[s], (s, before[s], skipped[s])
    lost = {(r["stage"], r["index"]) for r in last if r["event"] == "lost"}
    assert started <= lost | {(s, i) for s in STAGES for i in skipped[s]}
    redo = {(r["stage"], i) for r in last if r["event"] == "stage" for i in r.get("redo") or ()}
    redone = {(r["stage"], r["index"]) for r in last if r["event"] == "done" and r.get("redone")}
    assert redo <= redone and lost - {(s, i) for s in STAGES for i in skipped[s]} <= redo


def emflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return clirun.emflow(*args, cwd=cwd, timeout=120)


def held(stack: Path, tmp_path: Path, hold: str) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=stack / "src"))
    run_dir = tmp_path / "out" / "emflow-run"
    n = len(sessions(run_dir)) if run_dir.exists() else 0
    proc = cli(slurm_run(stack), tmp_path, env={"EMFLOW_PAUSE_AFTER": hold})
    stage = hold.split(",")[0].split(":")[0]
    wait_for(
        lambda: (
            len(sessions(run_dir)) > n
            and any(
                r["event"] == "pause" and r.get("stage") == stage for r in sessions(run_dir)[-1]
            )
        ),
        proc,
        f"the SLURM run held at {hold}",
        timeout=600,
    )
    return proc, run_dir


def test_status_and_control_on_a_tls_slurm_run_live_then_dead(stack, reference, tmp_path):
    proc, run_dir = held(stack, tmp_path, "slab:1")
    try:
        info = lat.read_scheduler_file(run_dir)
        assert info["address"].startswith("tls://")
        folder = run_dir / "secrets"
        files = sorted(p.name for p in folder.iterdir())
        workers = [f for f in files if f.startswith(".dask-jobqueue.worker.")]
        assert len(workers) == 3 and {"client-ca.pem", "client-cert.pem", "client-key.pem"} <= set(
            files
        )  # the worker jobs' certificates and the client's, owner-only
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert all((folder / f).stat().st_mode & 0o077 == 0 for f in files)
        jobs = our_jobs()
        assert len(jobs) == 2 and sorted(secrets.owner(folder)["jobs"]["ids"]) == sorted(jobs)

        live = emflow("status", "out", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
        assert f"(live, scheduler {info['address']}" in live.stdout
        rows = {ln.split()[0]: ln.split()[1:] for ln in live.stdout.splitlines()[2:]}
        assert rows["features"][:5] == ["16", "0", "0", "0", "16"] and rows["slab"][0] == "4"
        pause = emflow("pause", "out", cwd=tmp_path)
        assert pause.returncode == 0 and "paused run" in pause.stdout, pause.stderr
        assert emflow("resume", "out", "--stage", "slab", cwd=tmp_path).returncode == 0
        assert "PAUSED" in emflow("status", "out", cwd=tmp_path).stdout.splitlines()[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(our_jobs()) == sorted(jobs)  # the dead driver's worker jobs wait on

    dead = emflow("status", "out", "--json", cwd=tmp_path)
    assert dead.returncode == 0, dead.stderr
    assert f"its driver (pid {proc.pid}" in dead.stderr and "is not running" in dead.stderr
    snap = json.loads(dead.stdout)
    stages = {s["stage"]: s for s in snap["runs"][0]["stages"]}
    assert stages["features"]["counts"]["done"] == 16 and stages["match"]["counts"]["done"] == 15
    assert stages["match2"]["counts"]["done"] == 14  # second neighbours (no bridges needed)
    assert stages["slab"]["total"] == 4 and snap["live"] is False
    assert emflow("cancel", "out", cwd=tmp_path).returncode == 0

    before = markers(run_dir)
    again = cli(slurm_run(stack), tmp_path, env={"EMFLOW_PAUSE_AFTER": "slab:0"})
    try:
        wait_for(lambda: (lat.read_scheduler_file(run_dir) or {}).get("pid") == again.pid
                 and any(r["event"] == "pause" for r in sessions(run_dir)[-1]),
                 again, "the new driver, held at slab", timeout=600)  # fmt: skip
        now = sorted(p.name for p in folder.iterdir())
        assert not set(workers) & set(now), "the dead driver's certificates were removed"
        assert not set(jobs) & set(our_jobs()), "the dead driver's jobs were cancelled"
        assert emflow("resume", "out", cwd=tmp_path).returncode == 0
        _out, err = again.communicate(timeout=600)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait()
    assert again.returncode == 0, err
    assert list(folder.iterdir()) == []
    assert_resumed_on_slurm(run_dir, before, sessions(run_dir)[0])
    assert_identical(tmp_path / "out", reference)


def test_driver_sigkilled_in_every_stage_on_slurm(stack, reference, tmp_path):
    """One run after the other, each SIGKILLed in the next stage; each rerun skips exactly the
    units with markers and redoes what the dead driver had started; the last one completes."""
    run_dir = tmp_path / "out" / "emflow-run"
    for stage in STAGES:
        before = markers(run_dir) if run_dir.exists() else None
        previous = sessions(run_dir)[-1] if before is not None else []
        proc, run_dir = held(stack, tmp_path, HOLD[stage])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        this = sessions(run_dir)[-1]
        assert stage in [r["stage"] for r in this if r["event"] == "stage"]
        if before is not None:  # this run resumed the previous one correctly before its kill
            skipped = {s: set() for s in STAGES}
            for r in this:
                if r["event"] == "skipped":
                    skipped[r["stage"]] |= set(r["indices"])
            begun = [r["stage"] for r in this if r["event"] == "stage"]
            started = {(r["stage"], r["index"]) for r in previous if r["event"] == "start"}
            for s in begun:
                assert before[s] <= skipped[s], (stage, s, before[s], skipped[s])
            lost = {(r["stage"], r["index"]) for r in this if r["event"] == "lost"}
            assert started <= lost | {(s, i) for s in STAGES for i in skipped[s] | before[s]}
    before = markers(run_dir)
    killed = sessions(run_dir)[-1]
    last = cli(slurm_run(stack), tmp_path)
    _out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err
    assert_resumed_on_slurm(run_dir, before, killed)
    assert_identical(tmp_path / "out", reference)
    assert_no_jobs_left()


def test_ctrl_c_on_slurm_stops_jobs_and_the_run_resumes(stack, reference, tmp_path):
    proc, run_dir = held(stack, tmp_path, HOLD["match"])
    os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # Ctrl-C: exit 130, resumable
    assert_no_jobs_left()  # the interrupted driver cancelled its worker jobs
    before, killed = markers(run_dir), sessions(run_dir)[-1]
    again = cli(slurm_run(stack), tmp_path)
    _out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert_resumed(run_dir, before, killed)
    assert_identical(tmp_path / "out", reference)


def test_worker_killed_in_every_stage_on_slurm(stack, reference, tmp_path):
    """The worker process inside a SLURM job is SIGKILLed the moment it starts a unit of each
    stage (its nanny starts a new one); the run completes, the journal holds each unit lost with
    its worker and redone, and the output equals the reference."""
    proc, run_dir = held(stack, tmp_path, "features:0")
    err = run_with_worker_kills(proc, run_dir, timeout=600)
    assert proc.returncode == 0, err
    assert_lost_and_redone(run_dir)
    assert_identical(tmp_path / "out", reference)
    assert_no_jobs_left()
