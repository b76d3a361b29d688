"""Start-up stays light: a run imports only what it uses, and its processes end quickly.

* A run with alignment off needs no SciPy (only the alignment solve uses it, ~0.3 CPU-s to
  import in every process that would load it): neither the CLI driver nor its Dask workers
  import it.
* ``import emflow`` (which every worker does to run a unit) does not load the notebook API
  (:mod:`emflow.api`: the planner, the viewer), nor ``emflow.align`` the SIFT, RANSAC and
  solve code the render units do not use: those names load on first use.
* Local workers of the ``emflow`` console script do not run the script again (multiprocessing
  "spawn" re-runs a parent's ``__main__``): no typer, no CLI in a worker.
* The driver and every worker process freeze their objects before they end, so the
  interpreter's teardown does not walk them in a last garbage collection; the driver does
  not collect while the run starts (imports, cluster), and collects again once it runs.

Checked in subprocesses, from their ``sys.modules`` and ``gc.get_freeze_count()`` at exit
(workers report through a Dask worker preload file, the way a site would add one).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun

pytestmark = pytest.mark.integration

#: packages a run with alignment off must not import (driver or worker): the SciPy of the
#: solve, the numcodecs of the decoded-slice cache
UNUSED = ("scipy", "numcodecs")
#: what a run with alignment off never needs in any process: SIFT, RANSAC, the solve
ALIGNMENT = ("emflow.align.features", "emflow.align.match", "emflow.align.solve")
#: what a worker never needs: the command line and the notebook API
NOT_IN_WORKERS = ("typer", "emflow.cli", "emflow.api", "emflow.view", *ALIGNMENT)

RECIPE = """\
source: {{glob: "{src}/*.png"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: out
outputs:
  - {{format: precomputed}}
  - {{format: omezarr}}
"""

# the `emflow` console script as pip writes it, plus a report of the driver's modules at exit
CONSOLE_SCRIPT = """\
import sys
from emflow.cli import main
if __name__ == '__main__':
    import atexit, gc, json
    def report():
        mods = sorted(sys.modules)
        report = {"modules": mods, "frozen": gc.get_freeze_count(), "gc": gc.isenabled()}
        print("DRIVER " + json.dumps(report), file=sys.stderr)
    atexit.register(report)
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""

# a worker preload (DASK_DISTRIBUTED__WORKER__PRELOAD): each worker's modules when it closes
WORKER_REPORT = """\
import gc, json, os, sys

def dask_teardown(worker):
    report = {"modules": sorted(sys.modules), "frozen": gc.get_freeze_count()}
    with open(os.path.join(os.environ["REPORT_DIR"], f"worker-{os.getpid()}.json"), "w") as f:
        json.dump(report, f)
"""

# the API on a one-worker LocalCluster: the worker's modules after it ran every unit
API_WORKER = """\
import json, sys
from distributed import Client, LocalCluster
import emflow
if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            emflow.run("recipe.yaml", client=client, progress=False, restart=True)
            mods = client.run(lambda: sorted(sys.modules))
    print("MODULES " + json.dumps(next(iter(mods.values()))))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    write_stack(synthetic_slices((6, 96, 128), seed=5), root / "src")
    (root / "recipe.yaml").write_text(RECIPE.format(src=root / "src"))
    return root


@pytest.fixture(scope="module")
def cli_run(folder: Path) -> dict:
    """One `emflow run` through the console script: the driver's and the workers' reports."""
    (folder / "emflow").write_text(CONSOLE_SCRIPT)
    (folder / "worker_report.py").write_text(WORKER_REPORT)
    reports = folder / "reports"
    reports.mkdir()
    argv = [sys.executable, "emflow", "run", "recipe.yaml", "--restart", "-q"]
    env = {
        "REPORT_DIR": str(reports),
        "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(folder / "worker_report.py")]),
    }
    proc = clirun.start([*argv, "--workers", "2", "--threads", "1", "--dashboard", ":0"],
                        folder, env)  # fmt: skip
    _out, err = clirun.outputs(proc, timeout=300)
    assert proc.returncode == 0, err
    assert (folder / "out" / "precomputed" / "info").is_file()  # it really ran
    (line,) = [x for x in err.splitlines() if x.startswith("DRIVER ")]
    workers = [json.loads(p.read_text()) for p in sorted(reports.glob("worker-*.json"))]
    return {"driver": json.loads(line[len("DRIVER ") :]), "workers": workers}


def _packages(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_cli_run_without_alignment_imports_no_scipy_in_the_driver(cli_run):
    mods = _packages(cli_run["driver"]["modules"])
    assert "distributed" in mods and "emflow" in mods  # the hook saw a real run
    assert not mods & set(UNUSED), sorted(mods & set(UNUSED))
    assert "emflow.align.warp" in cli_run["driver"]["modules"]  # the render code, loaded
    assert not set(cli_run["driver"]["modules"]) & set(ALIGNMENT)


def test_cli_workers_skip_the_console_script_and_the_notebook_api(cli_run):
    assert len(cli_run["workers"]) == 2  # both workers reported when they closed
    for report in cli_run["workers"]:
        mods = set(report["modules"])
        assert "emflow.render" in mods and "tensorstore" in mods  # the worker ran units
        assert not mods & set(NOT_IN_WORKERS), sorted(mods & set(NOT_IN_WORKERS))
        assert not _packages(report["modules"]) & set(UNUSED)


def test_cli_driver_and_workers_freeze_their_objects_before_they_end(cli_run):
    assert cli_run["driver"]["frozen"] > 10_000  # every import's objects, not a handful
    assert cli_run["driver"]["gc"]  # collection paused while the run started, then back on
    for report in cli_run["workers"]:
        assert report["frozen"] > 10_000


def test_python_m_emflow_collects_again_once_the_command_runs(folder):
    """``python -m emflow`` loads the CLI without collecting, then collects again (and skips
    the CLI's own objects, frozen)."""
    code = (
        "import atexit, gc, runpy, sys\n"
        "atexit.register(lambda: print('GC', gc.isenabled(), gc.get_freeze_count() > 10_000))\n"
        "sys.argv = ['emflow', '--help']\n"
        "runpy.run_module('emflow', run_name='__main__', alter_sys=True)\n"
    )
    proc = clirun.start([sys.executable, "-c", code], folder)
    out, err = clirun.outputs(proc, timeout=120)
    assert proc.returncode == 0, err
    assert "Usage" in out and out.splitlines()[-1] == "GC True True"


def test_main_called_in_a_process_leaves_its_garbage_collection_alone(folder):
    """``main([...])`` from Python (tests, `emflow demo`) is not the process's command: no
    pause, no freeze."""
    from emflow.cli import main

    frozen = gc.get_freeze_count()
    assert main(["run", str(folder / "no-such-recipe.yaml"), "-q"]) == 2  # bad input: exit 2
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_import_emflow_loads_no_notebook_api(folder):
    code = (
        "import sys, emflow\n"
        "light = sorted(m for m in ('emflow.api', 'emflow.recipe', 'pydantic', 'numpy')"
        " if m in sys.modules)\n"
        "import emflow.plan, emflow.discover\n"  # submodules of the same names as API functions
        "print(light, emflow.plan.__module__, emflow.discover.__module__, emflow.Recipe.__name__)"
    )
    out, err = clirun.outputs(clirun.start([sys.executable, "-c", code], folder), timeout=120)
    assert out.split() == ["[]", "emflow.api", "emflow.api", "Recipe"], err


def test_workers_of_a_run_without_alignment_import_no_scipy(folder):
    (folder / "worker.py").write_text(API_WORKER)
    proc = clirun.start([sys.executable, "worker.py"], folder)
    out, err = clirun.outputs(proc, timeout=300)
    assert proc.returncode == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("MODULES ")]
    mods = set(json.loads(line[len("MODULES ") :]))
    assert "emflow.render" in mods and "tensorstore" in mods  # the worker ran the units
    assert not _packages(mods) & set(UNUSED), sorted(_packages(mods) & set(UNUSED))
    assert not mods & set(NOT_IN_WORKERS), sorted(mods & set(NOT_IN_WORKERS))


def test_the_command_line_imports_no_http_server_until_it_serves(folder):
    """``http.server`` (with http.client and email, ~25 ms) is imported by ``emflow serve`` and
    ``emflow view`` when they serve, not by every command (``emflow run`` registers them all)."""
    code = (
        "import sys, emflow.cli\n"
        "before = 'http.server' in sys.modules\n"
        "from emflow.cli.serve import make_server\n"
        "server = make_server(sys.argv[1], 0)\n"
        "server.server_close()\n"
        "print(before, type(server).__name__, 'http.server' in sys.modules)"
    )
    proc = clirun.start([sys.executable, "-c", code, str(folder)], folder)
    out, err = clirun.outputs(proc, timeout=120)
    assert out.split() == ["False", "ThreadingHTTPServer", "True"], err
