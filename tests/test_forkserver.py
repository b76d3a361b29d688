"""``emflow run`` forks its local workers from a server that imported Dask while the driver
started (emflow.cluster.forkserver): the workers start with the workers' environment, the
server is gone when the command ends, and the output is the output of spawned workers.
"""

from __future__ import annotations

import hashlib
import json
import sys
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
output_dir: {out}
outputs:
  - {{format: precomputed, encoding: jpeg}}
  - {{format: omezarr}}
"""

# a worker preload that says, as its worker starts, who its parent process is and what
# malloc settings the process was started with (/proc/<pid>/environ: the exec-time environment)
WORKER_SAYS = """\
import os

def dask_setup(worker):
    parent = os.getppid()
    with open(f"/proc/{parent}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\\0", b" ").decode()
    with open(f"/proc/{os.getpid()}/environ", "rb") as f:
        env = dict(x.split("=", 1) for x in f.read().decode().split("\\0") if "=" in x)
    line = (f"WORKER-START {parent} {'forkserver' in cmd} {env.get('MALLOC_ARENA_MAX')} "
            f"{env.get('MALLOC_TRIM_THRESHOLD_')}\\n")
    os.write(2, line.encode())  # one write: two workers share the pipe
"""

ARGS = ("--workers", "2", "--threads", "1", "--dashboard", ":0", "-q")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "emflow-run" not in p.parts and p.name != ".emflow-output.json"
    }


@two_cores
def test_workers_fork_from_the_server_with_their_environment_and_it_ends_with_the_run(tmp_path):
    from emflow.memory import WORKER_MALLOC

    write_stack(synthetic_slices((6, 96, 128), seed=5), tmp_path / "src")
    (tmp_path / "says.py").write_text(WORKER_SAYS)
    preload = {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(tmp_path / "says.py")])}
    runs = {}
    for mode in ("forked", "spawned"):
        (tmp_path / f"{mode}.yaml").write_text(
            RECIPE.format(src=tmp_path / "src", out=tmp_path / mode)
        )
        env = {**preload, "EMFLOW_FORKSERVER": "0" if mode == "spawned" else None}
        done = clirun.run(
            [sys.executable, "-m", "emflow", "run", f"{mode}.yaml", *ARGS], tmp_path, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        log = (tmp_path / mode / "emflow-run" / "libraries.log").read_text()
        runs[mode] = [line.split()[1:] for line in log.splitlines() if "WORKER-START" in line]
    forked, spawned = runs["forked"], runs["spawned"]
    assert len(forked) == 2 and len(spawned) == 2
    # both workers forked by one server, which was started with the workers' malloc settings
    assert {w[1] for w in forked} == {"True"} and len({w[0] for w in forked}) == 1
    assert {w[1] for w in spawned} == {"False"}
    trim = WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"]
    assert {(w[2], w[3]) for w in forked + spawned} == {("1", trim)}
    # the server ended with the command
    assert not psutil.pid_exists(int(forked[0][0])) or (
        psutil.Process(int(forked[0][0])).status() == psutil.STATUS_ZOMBIE
    )
    # the same bytes as spawned workers write
    a, b = _digests(tmp_path / "forked"), _digests(tmp_path / "spawned")
    assert len(a) >= 8 and a == b


def test_worker_env_is_the_same_before_and_after_dask_is_imported(tmp_path):
    """The fork server starts before the driver imports Dask: the environment it gets (Dask's
    pre-spawn defaults read from distributed.yaml, the user's config, emflow's malloc settings)
    is the one the nannies use once Dask is imported, a user's setting included."""
    code = (
        "import sys\n"
        "from emflow.cluster.local import worker_env\n"
        "before = worker_env()\n"
        "assert 'distributed' not in sys.modules\n"
        "import distributed  # noqa: F401\n"
        "after = worker_env()\n"
        "assert before == after, (before, after)\n"
        "assert after['OMP_NUM_THREADS'] == '1' and after['MALLOC_ARENA_MAX'] == '1'\n"
        "assert after['MY_SETTING'] == 'yes'\n"
    )
    (tmp_path / "dask").mkdir()
    (tmp_path / "dask" / "mine.yaml").write_text(
        "distributed:\n  nanny:\n    pre-spawn-environ:\n      MY_SETTING: 'yes'\n"
    )
    env = {"DASK_CONFIG": str(tmp_path / "dask")}
    done = clirun.run([sys.executable, "-c", code], tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_server_forks_from_one_thread_and_stop_kills_and_reaps_it(tmp_path):
    """The server forks from one thread (a fork of a process with more threads may copy a held
    lock); stop() ends and reaps it (no zombie), and a later start() in the same process starts
    a new one."""
    code = (
        "import multiprocessing, time\n"
        "import psutil\n"
        "from multiprocessing import forkserver as mp_forkserver\n"
        "from emflow.cluster import forkserver\n"
        "forkserver.start()\n"
        "assert forkserver.running()\n"
        "p = multiprocessing.get_context('forkserver').Process(target=time.sleep, args=(0,))\n"
        "p.start(); p.join()  # forked once the server's preload is done\n"
        "assert p.exitcode == 0, p.exitcode\n"
        "pid = mp_forkserver._forkserver._forkserver_pid\n"
        "server = psutil.Process(pid)\n"
        "assert server.num_threads() == 1, server.num_threads()\n"
        "forkserver.stop()\n"
        "assert not psutil.pid_exists(pid)  # reaped: no zombie either\n"
        "assert not forkserver.running()\n"
        "forkserver.start()  # a second run in this process gets a server again\n"
        "q = multiprocessing.get_context('forkserver').Process(target=time.sleep, args=(0,))\n"
        "q.start(); q.join()\n"
        "assert q.exitcode == 0, q.exitcode\n"
        "forkserver.stop()\n"
    )
    done = clirun.run([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_server_started_before_dask_is_used_only_with_the_workers_environment(tmp_path):
    """``emflow run`` starts the server before it imports Dask, with Dask's defaults read from
    distributed.yaml; once Dask is imported, a server whose environment is not the workers'
    (a user's ``pre-spawn-environ``) is stopped and the workers are spawned with it instead."""
    code = (
        "import sys\n"
        "from emflow.cluster import forkserver\n"
        "from emflow.cluster.local import worker_environment\n"
        "forkserver.start()\n"
        "assert 'dask' not in sys.modules, 'the server waited for Dask'\n"
        "assert forkserver.running()\n"
        "with worker_environment():\n"
        "    import dask\n"
        "    method = dask.config.get('distributed.worker.multiprocessing-method', None)\n"
        "    env = dask.config.get('distributed.nanny.pre-spawn-environ')\n"
        "print(forkserver.running(), method, env.get('MY_SETTING'))\n"
        "forkserver.stop()\n"
    )
    (tmp_path / "dask").mkdir()
    (tmp_path / "dask" / "mine.yaml").write_text(
        "distributed:\n  nanny:\n    pre-spawn-environ:\n      MY_SETTING: 'yes'\n"
    )
    said = {}
    for case, env in (("default", {}), ("user", {"DASK_CONFIG": str(tmp_path / "dask")})):
        done = clirun.run([sys.executable, "-c", code], tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        said[case] = done.stdout.split()
    assert said["default"] == ["True", "forkserver", "None"]
    running, method, mine = said["user"]  # Dask's own method (spawn)
    assert (running, mine) == ("False", "yes") and method in ("None", "spawn")
