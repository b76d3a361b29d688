"""Adaptive scaling on the real SLURM (``pytest -m slurm``): a run that starts on one job grows to
two while units wait, shrinks back to one when they run out, and writes the bytes of a local run.

The run aligns 24 slices of 1024² (feature units of ~0.5 s each): the window of waiting units is
what the scheduler's adaptive target sees.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

from emflow import api  # noqa: E402
from emflow.cluster import ClusterRequest, open_client  # noqa: E402
from emflow.testing import synthetic_slices, write_stack  # noqa: E402
from tests.conftest import tree_digest  # noqa: E402

JOB_NAME = f"emflow-a{uuid.uuid4().hex[:6]}"


def _ready() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: run `bash .ci/slurm.sh` first"
    proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a"], capture_output=True,
                          text=True, timeout=20)  # fmt: skip
    return None if proc.returncode == 0 and "up" in proc.stdout else "SLURM partition debug down"


if (_why := _ready()) is not None:
    pytest.skip(_why, allow_module_level=True)


def _jobs() -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-t", "PD,R,CF", "-o", "%i"],
                          capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    return proc.stdout.split()


def _recipe(src: Path, out: Path) -> dict:
    return {
        "source": {"glob": str(src / "*.png")},
        "voxel_size_nm": [8, 8, 40],
        "output_dir": str(out),
        "outputs": [
            {"format": "precomputed", "name": "em", "encoding": "raw"},
            {"format": "omezarr", "name": "em.ome.zarr"},
        ],
        "align": {"enabled": True},
        "enhance": {"clip_limit": 0.02, "kernel_size_px": 256},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("adapt") / "slices"
    write_stack(synthetic_slices((24, 1024, 1024), seed=5), src)
    return src


def _digest(out: Path) -> dict[str, dict[str, str]]:
    return {n: tree_digest(out / n) for n in ("em", "em.ome.zarr")}


def test_slurm_scales_up_while_units_wait_then_down_and_matches_local(stack, tmp_path):
    local = tmp_path / "local"
    request = ClusterRequest("local", workers=2, threads_per_worker=1, dashboard_address=":0")
    with open_client(request) as client:
        api.run(_recipe(stack, local), client=client, progress=False)
    want = _digest(local)

    site = tmp_path / "site.yaml"
    site.write_text(
        "queue: debug\ninterface: lo\ncores: 1\nmemory: 4GiB\n"
        f'walltime: "00:15:00"\ndeath_timeout: 30\njob_name: {JOB_NAME}\n'
    )
    request = ClusterRequest(
        "slurm", config_path=site, workers=1, max_workers=2,
        log_dir=tmp_path / "worker-logs", dashboard_address=":0",
    )  # fmt: skip
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(len(_jobs()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        with open_client(request) as client:
            client.wait_for_workers(1, timeout=180)
            watcher.start()
            api.run(_recipe(stack, tmp_path / "slurm"), client=client, progress=False)
            during = max(seen)
            # nothing waits any more: adapt retires the extra job, keeping the minimum of one
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(client.scheduler_info()["workers"]) > 1:
                time.sleep(1)
            after = len(client.scheduler_info()["workers"])
    finally:
        stop.set()
    assert during >= 2, f"adaptive scaling never went beyond one job (jobs seen: {set(seen)})"
    assert after == 1
    assert _digest(tmp_path / "slurm") == want
    deadline = time.monotonic() + 30
    while _jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _jobs() == [], "SLURM jobs outlived the run"
