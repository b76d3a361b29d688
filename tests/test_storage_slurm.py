"""An S3 source to S3 outputs on the real single-node SLURM (``pytest -m slurm``).

The SLURM workers find the object store and its credentials in their own environment
(the job inherits the submitting shell's AWS_* variables; nothing is written into the job
script), read the slices from the bucket and write both outputs into it: the bytes equal a
local run from a local copy of the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import slurm_unavailable, tree_digest
from tests.storage_servers import S3_SECRET, S3Server, clean_env, s3_env

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

_why = slurm_unavailable()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

JOB_NAME = f"emflow-s{uuid.uuid4().hex[:6]}"  # unique: this test sees and cancels only its jobs
RECIPE = """\
source: {{glob: "{glob}"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: {out}
enhance: {{clip_limit: 0}}
outputs:
  - {{format: precomputed, name: ng, encoding: raw, chunk_size_xyz: [32, 32, 8]}}
  - {{format: omezarr, name: z5, chunk_size_xyz: [32, 32, 8]}}
"""


def _our_jobs() -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i"], capture_output=True,
                          text=True, timeout=20, check=False)  # fmt: skip
    return proc.stdout.split()


@pytest.fixture
def s3() -> Iterator[S3Server]:
    try:
        with S3Server() as server:
            yield server
    finally:
        left = _our_jobs()
        if left:
            subprocess.run(["scancel", *left], timeout=30, check=False)


def _run(folder: Path, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emflow", "run", "recipe.yaml", "--dashboard", ":0", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    return proc.returncode, err


def test_s3_source_to_s3_outputs_on_slurm_matches_a_local_run(s3: S3Server, tmp_path: Path):
    from emflow.testing import synthetic_slices, write_stack

    write_stack(synthetic_slices((12, 160, 192), seed=8), tmp_path / "src", pattern="s%03d.png")
    bucket = s3.bucket()
    s3.upload_dir(tmp_path / "src", bucket, "raw")
    env = clean_env(
        {
            **s3_env(),
            "AWS_ENDPOINT_URL": s3.endpoint,
            "EMFLOW_STORE_RETRIES": "3",
            "EMFLOW_RUN_CACHE": str(tmp_path / "runs"),  # the single node: one file system
            "HOME": str(tmp_path / "home"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
    )
    local = tmp_path / "local"
    local.mkdir()
    (local / "recipe.yaml").write_text(RECIPE.format(glob=tmp_path / "src" / "*.png", out="out"))
    code, err = _run(local, ["--workers", "1", "--threads", "1"], env)
    assert code == 0, err[-3000:]
    site = tmp_path / "slurm.yaml"
    site.write_text(
        "queue: debug\ninterface: lo\ncores: 1\nmemory: 1GiB\n"
        f'walltime: "00:10:00"\ndeath_timeout: 60\njob_name: {JOB_NAME}\n'
    )
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "recipe.yaml").write_text(
        RECIPE.format(glob=f"s3://{bucket}/raw/*.png", out=f"s3://{bucket}/out")
    )
    args = ["--cluster", "slurm", "--cluster-config", str(site), "--workers", "1"]
    code, err = _run(remote, args, env)
    assert code == 0, err[-3000:]
    for name in ("ng", "z5"):
        got = {k: v for k, v in s3.digest(bucket, f"out/{name}").items()
               if k != ".emflow-output.json"}  # fmt: skip
        assert got == tree_digest(local / "out" / name), name
    assert S3_SECRET not in err
    for p in (tmp_path / "runs").rglob("*"):  # job scripts and worker logs included
        if p.is_file():
            assert S3_SECRET.encode() not in p.read_bytes(), p
