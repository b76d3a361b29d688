"""A run on a scheduler of its own (``--cluster tcp://…``) whose scheduler dies mid-run.

The driver must not wait forever nor report a bug: exit 3 with one line naming the
scheduler, the finished units kept; with a new scheduler the same recipe resumes, skips
what was done and writes the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.conftest import tree_digest

pytestmark = pytest.mark.integration

RECIPE = """\
source:
  glob: src/*.png
voxel_size_nm: [8, 8, 40]
output_dir: out
outputs:
  - format: precomputed
    name: raw
    encoding: raw
    chunk_size_xyz: [64, 64, 4]
align: false
run:
  slab_depth: 4
"""


def _scheduler_and_worker(folder: Path) -> tuple[object, object, str]:
    """A `dask scheduler` and one `dask worker` (2 threads), each in its own process group."""
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "scheduler.json"
    sched = clirun.start(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(info)],
        folder,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not info.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.exists(), "dask scheduler did not start"
    time.sleep(0.2)  # the file is complete once its JSON parses
    address = json.loads(info.read_text())["address"]
    worker = clirun.start(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2",
         "--no-dashboard", "--local-directory", str(folder / "worker")],
        folder,
    )  # fmt: skip
    return sched, worker, address


def test_lost_scheduler_exits_3_and_a_new_one_resumes(tmp_path):
    write_stack(synthetic_slices((16, 128, 128), seed=5), tmp_path / "src")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    reference = tmp_path / "ref"
    reference.mkdir()
    (reference / "recipe.yaml").write_text(RECIPE.replace("src/*.png", str(tmp_path / "src/*.png")))
    done = clirun.emflow("run", "recipe.yaml", "--serial", "-q", cwd=reference, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    procs = []
    try:
        sched, worker, address = _scheduler_and_worker(tmp_path / "cluster1")
        procs += [sched, worker]
        run = clirun.start_emflow(
            ["run", "recipe.yaml", "--cluster", address, "-q"],
            tmp_path,
            env={"EMFLOW_PAUSE_AFTER": "slab:2"},  # hold the run mid-stage
        )
        procs.append(run)
        slab_done = tmp_path / "out" / "emflow-run" / "done" / "slab"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(slab_done.glob("*.json"))) < 2:
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.1)
        assert len(list(slab_done.glob("*.json"))) >= 2, "the run never reached the slab stage"
        clirun.kill_group(sched)  # the scheduler dies (SIGKILL), its worker is orphaned
        lost = clirun.finish(run, 300)
        assert lost.returncode == 3, (lost.returncode, lost.stderr[-3000:])
        assert "Traceback" not in lost.stderr
        lines = [ln for ln in lost.stderr.splitlines() if ln.startswith("emflow: error:")]
        assert len(lines) == 1, lost.stderr
        assert f"lost the Dask scheduler at {address}" in lines[0]
        assert "run the same command again to resume" in lines[0]
        kept = {p.name for p in slab_done.glob("*.json")}
        assert len(kept) >= 2
        assert not (tmp_path / "out" / "raw").exists(), "a half-written output looks complete"

        sched2, worker2, address2 = _scheduler_and_worker(tmp_path / "cluster2")
        procs += [sched2, worker2]
        again = clirun.emflow("run", "recipe.yaml", "--cluster", address2, "-q", cwd=tmp_path,
                              timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        for p in procs:
            clirun.kill_group(p)
    skipped = [
        rec
        for rec in map(
            json.loads, (tmp_path / "out/emflow-run/journal.jsonl").read_text().splitlines()
        )
        if rec.get("event") == "skipped" and rec.get("stage") == "slab"
    ]
    assert {f"{i}.json" for rec in skipped for i in rec["indices"]} >= kept
    got = {
        k: v for k, v in tree_digest(tmp_path / "out" / "raw").items() if "emflow-output" not in k
    }
    want = {
        k: v for k, v in tree_digest(reference / "out" / "raw").items() if "emflow-output" not in k
    }
    assert got == want
