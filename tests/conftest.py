"""Shared fixtures: synthetic stacks on disk, readers of every output format."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def pytest_collection_modifyitems(config, items):
    """Skip tests needing ../shared/data when it is absent; in CI (``CI`` set) that is an error."""
    if DATA.is_dir():
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            f"real EM test data not found at {DATA}: CI needs ../shared beside the checkout"
        )
    skip = pytest.mark.skip(reason=f"real EM test data not found at {DATA}")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """Remember the session's exit status for :func:`pytest_unconfigure`."""
    session.config._emflow_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """Never hang after the summary: a thread a failed test left running (non-daemon) would
    keep the interpreter alive at exit. Name it and leave with the session's exit status."""
    left = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if not left:
        return
    names = ", ".join(sorted(t.name for t in left))
    print(f"\nconftest: threads still running after the session: {names}; exiting", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(getattr(config, "_emflow_exitstatus", 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return DATA


def slurm_unavailable() -> str | None:
    """Why the real SLURM (partition ``debug``) cannot be used here, or None when it can."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        return "sbatch not found: run `bash .ci/slurm.sh` first"
    proc = subprocess.run(
        ["sinfo", "-h", "-p", "debug", "-o", "%a"], capture_output=True, text=True, timeout=20
    )
    if proc.returncode != 0 or "up" not in proc.stdout:
        return f"SLURM partition debug not up ({proc.stderr.strip()}): run `bash .ci/slurm.sh`"
    return None


def read_pngs(paths) -> np.ndarray:
    return np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths])


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path (byte-identity checks).

    emflow's ownership marker (which names the output_dir's run folder) is not volume data.
    """
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".emflow-output.json"
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
