"""Start-up stays light: a run imports only what it uses.

A run with alignment off needs no SciPy (only the alignment solve uses it, ~0.3 CPU-s to
import in every process that would load it): neither the CLI driver nor its Dask workers
import it. Checked in subprocesses, from their ``sys.modules`` once the run has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun

pytestmark = pytest.mark.integration

#: packages a run with alignment off must not import (driver or worker)
UNUSED = ("scipy",)

RECIPE = """\
source: {{glob: "{src}/*.png"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: out
outputs:
  - {{format: precomputed}}
  - {{format: omezarr}}
"""

# the CLI's driver as the console script starts it: report the packages it imported at exit
DRIVER = """\
import atexit, json, sys
from emflow.cli import main
def report():
    print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
if __name__ == "__main__":
    atexit.register(report)
    sys.argv = ["emflow", *sys.argv[1:]]
    sys.exit(main())
"""

# the API on a one-worker LocalCluster: the worker's packages after it ran every unit
WORKER = """\
import json, sys
from distributed import Client, LocalCluster
import emflow
if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            emflow.run("recipe.yaml", client=client, progress=False)
            mods = client.run(lambda: sorted({m.split(".")[0] for m in sys.modules}))
    print("MODULES " + json.dumps(next(iter(mods.values()))))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    write_stack(synthetic_slices((6, 96, 128), seed=5), root / "src")
    (root / "recipe.yaml").write_text(RECIPE.format(src=root / "src"))
    return root


def _modules(stderr_or_stdout: str) -> set[str]:
    (line,) = [x for x in stderr_or_stdout.splitlines() if x.startswith("MODULES ")]
    return set(json.loads(line[len("MODULES ") :]))


def test_cli_run_without_alignment_imports_no_scipy_in_the_driver(folder):
    (folder / "driver.py").write_text(DRIVER)
    argv = [sys.executable, "driver.py", "run", "recipe.yaml", "--restart", "-q"]
    proc = clirun.start([*argv, "--workers", "1", "--threads", "1", "--dashboard", ":0"], folder)
    _out, err = clirun.outputs(proc, timeout=300)
    assert proc.returncode == 0, err
    assert (folder / "out" / "precomputed" / "info").is_file()  # it really ran
    mods = _modules(err)
    assert "distributed" in mods and "emflow" in mods  # the hook saw a real run
    assert not mods & set(UNUSED), sorted(mods & set(UNUSED))


def test_workers_of_a_run_without_alignment_import_no_scipy(folder):
    (folder / "worker.py").write_text(WORKER)
    proc = clirun.start([sys.executable, "worker.py"], folder)
    out, err = clirun.outputs(proc, timeout=300)
    assert proc.returncode == 0, err
    mods = _modules(out)
    assert "emflow" in mods and "tensorstore" in mods  # the worker ran the units
    assert not mods & set(UNUSED), sorted(mods & set(UNUSED))
