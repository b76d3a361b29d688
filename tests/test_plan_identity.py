"""Output bytes depend on the recipe and the stack, never on the cluster: the real CLI with
``--workers 1 --threads 1`` and ``--workers 2``, and a run SIGKILLed mid-stage then resumed
with another worker count, write byte-identical files. The stack is wider than a brick
(render stage, bricks cut in x and y) and its pyramid needs a second pass (hand-off sums).
``emflow plan`` prints the plan the run then executes and stores in the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emflow import lattice as lat
from emflow.plan import load_plan
from emflow.pyramid import reference_pyramid
from emflow.testing import synthetic_slices, write_stack
from tests.conftest import read_pngs, tree_digest
from tests.readers import zarr_tensorstore

pytestmark = pytest.mark.integration

SHAPE = (40, 1100, 1300)  # x and y beyond the 1024-px brick: a 2 × 2 grid of bricks
RECIPE = """\
source: {{glob: "{src}/*.png"}}
voxel_size_nm: [8, 8, 8]
align: false
output_dir: out
enhance: {{clip_limit: 0}}
outputs:
  - {{format: precomputed, name: jpeg, encoding: jpeg, chunk_size_xyz: [32, 32, 32]}}
  - {{format: precomputed, name: raw, encoding: raw, chunk_size_xyz: [32, 32, 32]}}
  - {{format: omezarr, name: z5, chunk_size_xyz: [32, 32, 32]}}
"""
NAMES = ("jpeg", "raw", "z5")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    paths = write_stack(synthetic_slices(SHAPE, seed=21), root / "src")
    return root, read_pngs(paths)


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_cli(folder: Path, src: Path, *flags: str) -> dict[str, dict[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(RECIPE.format(src=src))
    proc = cli("run", "recipe.yaml", "--dashboard", ":0", "-q", *flags, cwd=folder)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return {n: tree_digest(folder / "out" / n) for n in NAMES}


@pytest.fixture(scope="module")
def one_worker(stack, tmp_path_factory):
    root, _ = stack
    folder = tmp_path_factory.mktemp("w1")
    return folder, run_cli(folder, root / "src", "--workers", "1", "--threads", "1")


def test_plan_cli_prints_the_plan_the_run_stores(stack, one_worker, tmp_path):
    root, volume = stack
    folder, _ = one_worker
    stored = load_plan(folder / "out" / "emflow-run")
    assert stored is not None
    # a fresh folder: `emflow plan` plans what the run will execute
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=root / "src"))
    shown = subprocess.run(
        [sys.executable, "-m", "emflow", "plan", "recipe.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert stored.summary() in shown.stdout
    assert "stage render:" in shown.stdout and "stage coarse1:" in shown.stdout
    assert stored.passes[0].grid_zyx[1:] == (2, 2) and len(stored.passes) >= 2
    assert "planned memory per worker (" in shown.stdout and ": fits" in shown.stdout
    # workers smaller than the plan: said before anything starts
    small = subprocess.run(
        [sys.executable, "-m", "emflow", "plan", "recipe.yaml", "--memory", "200MiB"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "DOES NOT FIT: set run.memory_per_worker" in small.stdout, small.stdout
    # levels read back equal the exact pyramid of the source (lossless output)
    ref = reference_pyramid(volume, stored.levels)
    for k in range(len(stored.levels)):
        np.testing.assert_array_equal(zarr_tensorstore(folder / "out" / "z5", k), ref[k])


def test_two_workers_write_the_same_bytes(stack, one_worker, tmp_path):
    root, _ = stack
    _, want = one_worker
    assert run_cli(tmp_path, root / "src", "--workers", "2") == want


def test_killed_run_resumed_with_another_worker_count_writes_the_same_bytes(
    stack, one_worker, tmp_path
):
    root, _ = stack
    _, want = one_worker
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=root / "src"))
    run_dir = tmp_path / "out" / "emflow-run"
    proc = cli("run", "recipe.yaml", "--workers", "2", "--threads", "1", "--dashboard", ":0",
               "-q", cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = lat.journal_done(run_dir)
            if any(s == "slab" for s, _ in done):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    plan_before = json.loads((run_dir / "plan.json").read_text())
    # the rendered copy lost too (scratch space cleaned): the render units it needs run again
    import shutil

    shutil.rmtree(run_dir / "rendered")
    slab_done = {i for s, i in lat.journal_done(run_dir) if s == "slab"}
    assert 1 <= len(slab_done) < plan_before["passes"][0]["grid_zyx"][1] * 2
    # resume with one single-threaded worker: the stored plan is executed, not a new one
    proc = cli("run", "recipe.yaml", "--workers", "1", "--threads", "1", "--dashboard", ":0",
               "-q", cwd=tmp_path)  # fmt: skip
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert json.loads((run_dir / "plan.json").read_text()) == plan_before
    assert {n: tree_digest(tmp_path / "out" / n) for n in NAMES} == want


def test_uncompressed_tiff_bricks_read_windows_without_a_rendered_copy(tmp_path):
    """Big uncompressed TIFF slices need no rendered copy: bricks cut in x/y memory-map their
    window of each page (16-bit here, windowed to 8 bit); levels equal the exact pyramid."""
    import tifffile

    from emflow import recipe_from_dict, run
    from emflow.bitdepth import window_to_uint8

    rng = np.random.default_rng(4)
    vol16 = rng.integers(1000, 60000, size=(9, 1100, 1300), dtype=np.uint16)
    (tmp_path / "src").mkdir()
    for z in range(9):
        tifffile.imwrite(tmp_path / "src" / f"s{z:02d}.tif", vol16[z])
    recipe = recipe_from_dict(
        {
            "source": {"glob": str(tmp_path / "src" / "*.tif")},
            "voxel_size_nm": [8, 8, 8],
            "align": False,
            "output_dir": str(tmp_path / "out"),
            "enhance": {"clip_limit": 0},
            "depth": {"window": [2000, 50000]},
            "outputs": [{"format": "omezarr", "name": "z5", "chunk_size_xyz": [32, 32, 32]}],
        }
    )
    result = run(recipe)
    plan = result.plan
    assert not plan.render_stage and plan.passes[0].grid_zyx[1:] == (2, 2)
    assert not (result.run_dir / "rendered").exists()
    volume = np.stack([window_to_uint8(s, 2000, 50000) for s in vol16])
    ref = reference_pyramid(volume, plan.levels)
    for k in range(len(plan.levels)):
        np.testing.assert_array_equal(zarr_tensorstore(result.output_paths["z5"], k), ref[k])


def test_plan_with_a_saved_alignment_prints_the_aligned_frame_the_run_executes(tmp_path):
    """`emflow plan --alignment a.json` plans the aligned frame; `emflow run --alignment` then
    stores and executes exactly that plan."""
    from emflow.align.solve import Alignment

    write_stack(synthetic_slices((6, 300, 280), seed=2), tmp_path / "src")
    shifts = [(0.0, 0.0), (12.0, 3.0), (40.0, -5.0), (65.0, 10.0), (80.0, 0.0), (101.0, 20.0)]
    transforms = {
        z: np.array([[1.0, 0.0, dx], [0.0, 1.0, dy + 5.0]]) for z, (dx, dy) in enumerate(shifts)
    }
    Alignment(transforms, (330, 381), "global").to_json(tmp_path / "a.json")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(src=tmp_path / "src"))
    shown = subprocess.run(
        [sys.executable, "-m", "emflow", "plan", "recipe.yaml", "--alignment", "a.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "plan: frame: from a.json" in shown.stdout
    assert "frame: x 381 × y 330 px, 6 slices" in shown.stdout
    proc = cli("run", "recipe.yaml", "--alignment", "a.json", "--dashboard", ":0", "-q",
               cwd=tmp_path)  # fmt: skip
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    stored = load_plan(tmp_path / "out" / "emflow-run")
    assert stored is not None and stored.frame_shape_yx == (330, 381)
    assert stored.summary() in shown.stdout
