"""``emflow run`` starts its local cluster while the run is still checked (emflow.cluster.early):
the checks keep their order and their messages, and nothing outlives the command.

* A run the checks refuse (an output folder emflow did not write) exits 2 with its one-line
  message, no traceback, no Dask output on the terminal, nothing written next to the foreign
  folder, and no process of its cluster left in its process group.
* Ctrl-C while the cluster starts exits 130 with the resume message, and leaves no process.
* Worker output from before the run folder existed reaches the run's libraries.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun

pytestmark = pytest.mark.integration
two_cores = clirun.TWO_CORES

RECIPE = """\
source: {{glob: "{src}/*.png"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: out
outputs:
  - {{format: precomputed}}
  - {{format: omezarr}}
"""

# a worker preload (DASK_DISTRIBUTED__WORKER__PRELOAD) that prints a line as its worker starts
WORKER_SAYS = """\
import os, sys

def dask_setup(worker):
    print(f"EARLY-WORKER-LINE {os.getpid()}", file=sys.stderr, flush=True)
"""

ARGS = ("--workers", "2", "--threads", "1", "--dashboard", ":0")


@pytest.fixture()
def project(tmp_path) -> Path:
    write_stack(synthetic_slices((4, 64, 96), seed=3), tmp_path / "src")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=tmp_path / "src"))
    return tmp_path


def _group_left(pgid: int, timeout: float = 10.0) -> list[str]:
    """Command lines of processes still in process group ``pgid`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.info["pid"]) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.info["cmdline"] or []))
            except (ProcessLookupError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@two_cores
def test_refused_run_says_why_and_leaves_no_cluster_process(project):
    foreign = project / "out" / "precomputed"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("not emflow's")
    proc = clirun.start_emflow(["run", "recipe.yaml", *ARGS], project)
    try:
        out, err = proc.communicate(timeout=120)
        left = _group_left(proc.pid)
    finally:
        clirun.kill_group(proc)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "distributed." not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("emflow: error:")]
    assert str(foreign) in line and "not written by emflow" in line
    assert err.strip() == line  # the only line on the terminal
    assert sorted(p.name for p in (project / "out").iterdir()) == ["precomputed"]
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    assert left == []


@two_cores
def test_ctrl_c_while_the_cluster_starts_exits_130_and_leaves_no_process(project):
    proc = clirun.start_emflow(["run", "recipe.yaml", *ARGS], project)
    try:
        deadline = time.monotonic() + 120
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)  # the first process of the cluster (a worker, or Dask's tracker)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        out, err = proc.communicate(timeout=120)
        left = _group_left(proc.pid)
    finally:
        clirun.kill_group(proc)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err
    assert err.rstrip().endswith("emflow: interrupted; run the same command to resume"), err
    assert left == []
    assert not (project / "out" / "precomputed" / "info").exists()


@two_cores
def test_worker_output_before_the_run_folder_existed_reaches_libraries_log(project):
    (project / "says.py").write_text(WORKER_SAYS)
    env = {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(project / "says.py")])}
    done = clirun.run([sys.executable, "-m", "emflow", "run", "recipe.yaml", *ARGS, "-q"],
                      project, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EARLY-WORKER-LINE" not in done.stderr  # not on the terminal
    log = (project / "out" / "emflow-run" / "libraries.log").read_text()
    assert log.startswith("--- ")  # the log's own header comes first
    assert log.count("EARLY-WORKER-LINE") == 2, log[-3000:]


def test_libraries_to_log_attaches_what_was_held(tmp_path):
    """In one process: fd 2 output made before the log existed lands in it, after its header;
    output held by a discarded one (a refused run) never reaches a log attached afterwards, and
    the terminal is back either way."""
    code = f"""
import os, sys
from emflow.cli.console import HeldOutput, libraries_to_log
held = HeldOutput()
os.write(2, b"held line\\n")
said = []
with libraries_to_log({str(tmp_path / 'libraries.log')!r}, said.append, held=held):
    os.write(2, b"later line\\n")
held.discard()
dropped = HeldOutput()
os.write(2, b"dropped line\\n")
dropped.discard()
with libraries_to_log({str(tmp_path / 'second.log')!r}, said.append, held=dropped):
    pass
print("terminal line", file=sys.stderr)
"""
    assert _stderr_of(code) == "terminal line\n"
    assert _log_lines(tmp_path / "libraries.log") == ["held line", "later line"]
    second = (tmp_path / "second.log").read_text().splitlines()
    assert len(second) == 1 and second[0].startswith("--- "), second


@two_cores
def test_spawned_returns_once_a_worker_process_runs():
    """EarlyCluster.spawned lets the driver hold its own imports until the local cluster has
    spawned a worker process (a child of this process, running), and no longer."""
    from emflow.cluster import ClusterRequest
    from emflow.cluster.early import EarlyCluster

    request = ClusterRequest("local", workers=1, threads_per_worker=1, dashboard_address=":0")
    before = {p.pid for p in psutil.Process().children()}
    early = EarlyCluster(request)
    try:
        assert early.spawned(120) is True
        new = [p for p in psutil.Process().children() if p.pid not in before]
        workers = [p for p in new if "spawn_main" in " ".join(p.cmdline())]
        assert workers, [p.cmdline() for p in new]
        with early.client() as client:
            assert client.submit(sum, [2, 3]).result() == 5
    finally:
        early.close()
    _gone, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == []


def test_a_process_spawned_on_the_held_pipe_before_routing_writes_into_the_log(tmp_path):
    """``emflow run`` starts its fork server on the held output's pipe before it reads the
    recipe (HeldOutput(routed=False).spawn): that process's output reaches the run's log, while
    the driver's own fd 2 stays the terminal until it is routed; a refused run's never-routed
    pipe is dropped, terminal intact."""
    code = f"""
import os, subprocess, sys
from emflow.cli.console import HeldOutput, libraries_to_log
said = []
held = HeldOutput(routed=False)
procs = []
held.spawn(lambda: procs.append(subprocess.Popen(
    [sys.executable, "-c", "import os; os.write(2, b'child line\\\\n')"])))
procs[0].wait()
os.write(2, b"terminal before\\n")
with libraries_to_log({str(tmp_path / 'libraries.log')!r}, said.append, held=held):
    os.write(2, b"later line\\n")
held.discard()
refused = HeldOutput(routed=False)
refused.spawn(lambda: subprocess.run(
    [sys.executable, "-c", "import os; os.write(2, b'refused child\\\\n')"]))
refused.discard()
print("terminal after", file=sys.stderr)
"""
    assert _stderr_of(code) == "terminal before\nterminal after\n"
    assert _log_lines(tmp_path / "libraries.log") == ["child line", "later line"]


def _stderr_of(code: str) -> str:
    """What a fresh interpreter running ``code`` wrote to its stderr (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr


def _log_lines(path) -> list[str]:
    """The lines of a libraries.log after its "--- " header line."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("--- "), lines
    return lines[1:]
