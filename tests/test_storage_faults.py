"""Object-store faults through the real CLI: a store that dies mid-run, wrong credentials,
and an environment that would print credentials.

* moto's S3 server (in this process) holds the source stack and the outputs. A run is held
  with ``EMFLOW_PAUSE_AFTER`` after its first slab unit, the server is stopped, the run is
  released: the remaining units retry (``EMFLOW_STORE_RETRIES``) and the run ends with exit 3
  and one line naming the endpoint; no output is published. The server comes back on the
  same port with the same buckets, the same command resumes and the outputs are
  byte-identical to an uninterrupted run.
* moto's server in a child process with IAM authentication on (:class:`AuthS3Server`):
  a planted wrong secret key makes ``emflow validate`` and ``emflow run`` exit 2 before
  anything is written, naming the bucket and the endpoint and what to check; the planted
  secret appears nowhere.
* ``TENSORSTORE_CURL_VERBOSE`` / ``TENSORSTORE_VERBOSE_LOGGING=curl`` (tensorstore would
  print request headers) with a bucket source or output: refused with exit 2 naming the
  variable; a local run is not affected.

Every CLI process runs in its own process group with a timeout and is killed in a finally.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emflow.testing import synthetic_slices, write_stack
from tests.conftest import tree_digest
from tests.storage_servers import (
    S3_KEY_ID,
    S3_SECRET,
    S3Server,
    clean_env,
    s3_env,
)

SHAPE = (10, 96, 128)
RECIPE = """\
source: {{glob: "{glob}"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: {output_dir}
enhance: {{clip_limit: 0}}
outputs:
  - {{format: precomputed, name: ng, encoding: raw, chunk_size_xyz: [32, 32, 4]}}
  - {{format: omezarr, name: z5, chunk_size_xyz: [32, 32, 4]}}
run: {{slab_depth: 4}}
"""
OUTPUTS = ("ng", "z5")
#: what makes each output readable (published last)
PUBLISHED = {"ng": "info", "z5": "zarr.json"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-stack")
    write_stack(synthetic_slices(SHAPE, seed=7), root / "raw", pattern="s%03d.png")
    return root / "raw"


@pytest.fixture(scope="module")
def s3(stack: Path) -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


def _emflow(folder: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _cli(folder: Path, env: dict[str, str], *args: str, timeout: float = 300):
    proc = _emflow(folder, env, *args)
    out, err = _finish(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


RUN = ("run", "recipe.yaml", "--dashboard", ":0", "--workers", "1", "--threads", "2", "-q")


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return clean_env(
        {
            "EMFLOW_STORE_RETRIES": "2",
            "HOME": str(home),
            "EMFLOW_RUN_CACHE": str(home / "runs"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **(extra or {}),
        }
    )


def _write_recipe(folder: Path, glob: str, output_dir: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(RECIPE.format(glob=glob, output_dir=output_dir))


@pytest.fixture(scope="module")
def uninterrupted(stack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digests of the outputs of the same recipe run once, start to end, on local disk."""
    folder = tmp_path_factory.mktemp("fault-reference")
    _write_recipe(folder, str(stack / "*.png"), "out")
    done = _cli(folder, _env(folder / "home"), *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: tree_digest(folder / "out" / name) for name in OUTPUTS}


def _bucket_digest(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    """Like tree_digest: every object under prefix/ but emflow's ownership marker."""
    return {k: v for k, v in server.digest(bucket, prefix).items() if k != ".emflow-output.json"}


def _one_line(stderr: str, needle: str) -> str:
    lines = [ln for ln in stderr.splitlines() if needle in ln]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------
# the store stops answering mid-run
# ---------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("source", ["s3", "local"])
def test_store_that_stops_mid_run_exits_3_then_the_same_command_resumes_byte_identical(
    source: str,
    stack: Path,
    s3: S3Server,
    uninterrupted: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outputs in the bucket; the slices in it too (the next unit fails reading them) or on
    local disk (it fails writing chunks). Two CLI runs (held + faulted, resumed) after the
    shared reference run: ~15-25 s each; the fault needs a run that has done work."""
    from emflow import lattice as lat
    from emflow.io.runmirror import local_dir_for

    bucket = s3.bucket("fault")
    s3.upload_dir(stack, bucket, "em/raw")
    env = _env(tmp_path / "home", {**s3_env(), "AWS_ENDPOINT_URL": s3.endpoint})
    folder = tmp_path / "run"
    glob = f"s3://{bucket}/em/raw/*.png" if source == "s3" else str(stack / "*.png")
    _write_recipe(folder, glob, f"s3://{bucket}/out")
    monkeypatch.setenv("EMFLOW_RUN_CACHE", env["EMFLOW_RUN_CACHE"])
    run_dir = local_dir_for(f"s3://{bucket}/out/emflow-run")

    proc = _emflow(folder, {**env, "EMFLOW_PAUSE_AFTER": "slab:1"}, *RUN)
    try:
        deadline = time.monotonic() + 240
        while True:  # held in slab after its first unit (which completes)
            journal = lat.read_journal(run_dir) if run_dir.exists() else []
            paused = any(r["event"] == "pause" and r.get("stage") == "slab" for r in journal)
            done = [r for r in journal if r["event"] == "done" and r.get("stage") == "slab"]
            if paused and done:
                break
            assert proc.poll() is None, _finish(proc)[1][-3000:]
            assert time.monotonic() < deadline, "the run never paused in slab"
            time.sleep(0.1)
        written = s3.keys(bucket, "out/")
        assert any(k.startswith("out/ng/") and not k.endswith(".json") for k in written)
        s3.stop()  # the store goes away mid-run
        released = _cli(folder, env, "resume", str(run_dir), timeout=120)
        assert released.returncode == 0, released.stderr[-3000:]
        _out, err = _finish(proc, 300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if not s3.running:
            s3.start()
    assert proc.returncode == 3, err[-3000:]
    line = _one_line(err, "did not answer")
    assert line.startswith("emflow: ") and s3.endpoint in line, line
    assert "run the same command again" in line
    # the run folder says what failed; nothing looks complete
    assert not (run_dir / "COMPLETE").exists()
    assert s3.endpoint in (run_dir / "run.log").read_text()
    # the restarted server kept every object (moto's backends live in this process)
    assert s3.keys(bucket, "out/") == written
    for name, meta in PUBLISHED.items():
        assert f"out/{name}/{meta}" not in written, name
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]

    again = _cli(folder, env, *RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    for name, want in uninterrupted.items():
        assert want and _bucket_digest(s3, bucket, f"out/{name}") == want, name
    assert (run_dir / "COMPLETE").exists()
    journal = lat.read_journal(run_dir)
    slab_done = [r for r in journal if r["event"] == "done" and r.get("stage") == "slab"]
    assert len({r["index"] for r in slab_done}) == len(slab_done)  # no unit ran twice
    assert S3_SECRET not in err + again.stderr + again.stdout
