"""Crash and resume with the real pipeline: a worker SIGKILLed mid-run, a driver SIGKILLed mid-run
and resumed by `emflow run`; every output file byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from emflow import lattice as lat
from emflow import recipe_from_dict, run
from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.conftest import tree_digest

SHAPE = (96, 384, 384)  # 12 slabs of 8 slices: small, but long enough to interrupt
OUTPUTS = [
    {"format": "precomputed", "name": "raw", "encoding": "raw", "chunk_size_xyz": [64, 64, 8]},
    {"format": "omezarr", "name": "z5", "chunk_size_xyz": [64, 64, 8]},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("lattice_e2e")
    write_stack(synthetic_slices(SHAPE, seed=11), root / "src")
    return root


def recipe_dict(root: Path, out: str) -> dict:
    return {
        "source": {"glob": str(root / "src" / "*.png")},
        "voxel_size_nm": [8, 8, 8],
        "align": False,
        "output_dir": str(root / out),
        "outputs": OUTPUTS,
        "run": {"slab_depth": 8},
    }


@pytest.fixture(scope="module")
def reference(stack):
    """The uninterrupted run (serial) every interrupted run must equal byte for byte."""
    result = run(recipe_from_dict(recipe_dict(stack, "reference")))
    assert len(result.plan.passes[0].blocks) == 12
    return {name: tree_digest(path) for name, path in result.output_paths.items()}


def assert_identical(outputs: dict[str, Path], reference: dict[str, dict[str, str]]) -> None:
    assert set(outputs) == set(reference)
    for name, path in outputs.items():
        digest = tree_digest(path)
        assert digest == reference[name], f"{name}: files differ from the uninterrupted run"
        assert len(digest) > 10


@pytest.mark.integration
def test_worker_sigkilled_mid_run_output_identical(stack, reference):
    from distributed import Client, LocalCluster

    recipe = recipe_from_dict(recipe_dict(stack, "worker_killed"))
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        pids = client.run(os.getpid)
        lat.ensure_plugin(client)
        box: dict = {}

        def drive() -> None:
            try:
                box["result"] = run(recipe, client=client)
            except BaseException as exc:  # reported below
                box["error"] = exc

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        killed = None
        deadline = time.time() + 120
        while killed is None and t.is_alive() and time.time() < deadline:
            snap = client.sync(client.scheduler.emflow_lattice, cells=True) or {"runs": []}
            slab = [st for r in snap["runs"] for st in r["stages"] if st["stage"] == "slab"]
            if slab and slab[0]["counts"]["done"] >= 1 and "r" in slab[0]["cells"]:
                run_id = snap["runs"][0]["run_id"]
                running = [
                    (
                        i,
                        client.sync(
                            client.scheduler.emflow_unit, run_id=run_id, stage="slab", index=i
                        ),
                    )
                    for i, c in enumerate(slab[0]["cells"])
                    if c == "r"
                ]
                index, unit = max(running, key=lambda iu: iu[1]["start"] or 0)  # just started
                if unit["state"] == "running" and unit["worker"] in pids:
                    os.kill(pids[unit["worker"]], signal.SIGKILL)
                    killed = (run_id, index, unit["worker"], time.time())
                    break
            time.sleep(0.01)
        assert killed is not None, "no slab unit was seen running"
        t.join(300)
        assert not t.is_alive()
        assert "error" not in box, box.get("error")
        run_id, index, worker, t_kill = killed
        unit = client.sync(client.scheduler.emflow_unit, run_id=run_id, stage="slab", index=index)
        workers_after = set(client.scheduler_info()["workers"])
    assert worker not in workers_after  # the process really died (the nanny started a new one)
    states = [h[1] for h in unit["history"]]
    print(f"killed {worker} running slab[{index}]; its history: {unit['history']}")
    # the killed unit was lost with its worker and redone, unless it had just finished when the
    # signal landed
    assert (states[:3] == ["queued", "running", "lost"] and unit["state"] == "redone") or (
        states == ["queued", "running", "done"] and unit["end"] <= t_kill + 0.5
    )
    assert_identical(box["result"].output_paths, reference)
    assert set(lat.done_markers(box["result"].run_dir, "slab")) == set(range(12))


RECIPE_YAML = """\
source:
  glob: {src}/*.png
voxel_size_nm: [8, 8, 8]
align: false
output_dir: out
outputs:
  - format: precomputed
    name: raw
    encoding: raw
    chunk_size_xyz: [64, 64, 8]
  - format: omezarr
    name: z5
    chunk_size_xyz: [64, 64, 8]
run:
  slab_depth: 8
"""


def emflow_cli(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


@pytest.mark.integration
def test_driver_killed_then_resumed_skips_journaled_units(stack, reference, tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE_YAML.format(src=stack / "src"))
    run_dir = tmp_path / "out" / "emflow-run"
    args = ("run", "recipe.yaml", "--workers", "2", "--threads", "1", "--dashboard", ":0", "-q")
    proc = emflow_cli(*args, cwd=tmp_path)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if sum(1 for s, _ in lat.journal_done(run_dir) if s == "slab") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, ("the run ended before it could be killed", proc.communicate())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its scheduler, nannies and workers
        proc.wait()
    time.sleep(0.5)
    journaled = lat.journal_done(run_dir)
    slab_journaled = {i for s, i in journaled if s == "slab"}
    assert 3 <= len(slab_journaled) < 12
    assert not (tmp_path / "out" / "emflow-run" / "COMPLETE").exists()

    # status from the journal while nothing runs
    st = clirun.emflow("status", "out", cwd=tmp_path, timeout=120)
    assert st.returncode == 0, st.stderr
    assert "(journal)" in st.stdout and "slab" in st.stdout

    # every marker is a unit durably done (a worker may have finished one after the driver died)
    markers = {(s, i) for s in ("slab",) for i in lat.done_markers(run_dir, s)}
    assert {("slab", i) for i in slab_journaled} <= markers

    proc2 = emflow_cli(*args, cwd=tmp_path)
    _out, err = proc2.communicate(timeout=300)
    assert proc2.returncode == 0, err
    sessions = [r["session"] for r in lat.read_journal(run_dir) if r["event"] == "session"]
    assert len(sessions) == 2
    last = [r for r in lat.read_journal(run_dir) if r.get("session") == sessions[-1]]
    skipped = {
        i for r in last if r["event"] == "skipped" and r["stage"] == "slab" for i in r["indices"]
    }
    redone = {
        r["index"]
        for r in last
        if r["event"] == "done" and r["stage"] == "slab" and not r.get("recovered")
    }
    assert skipped == {i for s, i in markers if s == "slab"}  # every unit the journal holds done
    assert slab_journaled <= skipped and len(skipped) >= 3
    assert redone == set(range(12)) - skipped  # the rest, and only the rest, redone
    assert_identical({o["name"]: tmp_path / "out" / o["name"] for o in OUTPUTS}, reference)


@pytest.mark.integration
def test_cli_cancel_stops_with_exit_3_and_run_resumes(stack, reference, tmp_path):
    """`emflow status/cancel OUT` reach the live run through emflow-run/scheduler.json: running
    units finish, `emflow run` exits 3 with one line, and running it again completes identically.
    (The run is paused first, through the same scheduler record, so the CLI's start-up time
    cannot let the small run finish before the cancel arrives.)"""
    from emflow.lattice import live_run

    (tmp_path / "recipe.yaml").write_text(RECIPE_YAML.format(src=stack / "src"))
    run_dir = tmp_path / "out" / "emflow-run"
    args = ("run", "recipe.yaml", "--workers", "1", "--threads", "2", "--dashboard", ":0", "-q")
    proc = emflow_cli(*args, cwd=tmp_path)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if sum(1 for s, _ in lat.journal_done(run_dir) if s == "slab") >= 2:
                break
            time.sleep(0.02)
        with live_run(run_dir) as live_client:
            assert live_client is not None
            client, info = live_client
            client.sync(client.scheduler.emflow_pause, run_id=info["run_id"])
        live = clirun.emflow("status", "out", cwd=tmp_path, timeout=120)
        assert "(live, scheduler tcp://" in live.stdout and "PAUSED" in live.stdout, live
        cancel = clirun.emflow("cancel", "out", cwd=tmp_path, timeout=120)
        assert cancel.returncode == 0, cancel.stderr
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, err
    lines = [ln for ln in err.splitlines() if ln.startswith("emflow: error:")]
    assert len(lines) == 1 and "cancelled" in lines[0] and "Traceback" not in err
    done = set(lat.done_markers(run_dir, "slab"))
    assert 2 <= len(done) < 12
    proc2 = emflow_cli(*args, cwd=tmp_path)
    _out, err = proc2.communicate(timeout=300)
    assert proc2.returncode == 0, err
    assert_identical({o["name"]: tmp_path / "out" / o["name"] for o in OUTPUTS}, reference)
