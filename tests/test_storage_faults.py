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
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.conftest import tree_digest
from tests.storage_servers import (
    S3_KEY_ID,
    S3_SECRET,
    AuthS3Server,
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
    with S3Server() as server:
        yield server


def _emflow(folder: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", *args],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _cli(folder: Path, env: dict[str, str], *args: str, timeout: float = 300):
    proc = _emflow(folder, env, *args)
    out, err = clirun.outputs(proc, timeout)
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
            assert proc.poll() is None, clirun.outputs(proc)[1][-3000:]
            assert time.monotonic() < deadline, "the run never paused in slab"
            time.sleep(0.1)
        written = s3.keys(bucket, "out/")
        assert any(k.startswith("out/ng/") and not k.endswith(".json") for k in written)
        s3.stop()  # the store goes away mid-run
        released = _cli(folder, env, "resume", str(run_dir), timeout=120)
        assert released.returncode == 0, released.stderr[-3000:]
        _out, err = clirun.outputs(proc, 300)
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
    assert "(connection refused, 2 attempts)" in line, line  # EMFLOW_STORE_RETRIES, on workers
    # what it was doing, naming the object: reading a slice (source in the bucket), or, with
    # local slices, writing a chunk; or, either way, reading the hand-off a finished slab left
    # (which comes first depends on the unit the scheduler releases first after the pause)
    doing = r"trying to read s0" if source == "s3" else r"writing out/"
    assert re.search(rf" while ({doing}|reading out/emflow-run/handoff/)", line), line
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


# ---------------------------------------------------------------------------------------
# wrong credentials, missing bucket: exit 2 before any work
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_s3(stack: Path) -> Iterator[AuthS3Server]:
    server = AuthS3Server(buckets=("lab-em", "lab-out"))
    try:
        for p in sorted(stack.glob("*.png")):
            server.put("lab-em", f"raw/{p.name}", p.read_bytes())
        yield server
    finally:
        server.stop()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.integration
def test_wrong_credentials_exit_2_before_any_work_naming_the_bucket_never_the_secret(
    stack: Path, auth_s3: AuthS3Server, tmp_path: Path
) -> None:
    """A server that checks keys: the right key reads the source (validate passes); a
    planted wrong secret (and an unknown key id) makes validate and run exit 2 naming the
    bucket, the endpoint and what to check; nothing is written; the planted values appear
    nowhere. Five short CLI calls (~5-9 s each: no cluster is started)."""
    server = auth_s3
    home = tmp_path / "home"
    pattern = "s3://lab-em/raw/s%03d.png"
    folder = tmp_path / "run"

    def recipe(source: str, output_dir: str) -> None:
        folder.mkdir(exist_ok=True)
        text = RECIPE.format(glob="G", output_dir=output_dir)
        text = text.replace('source: {glob: "G"}', source)
        (folder / "recipe.yaml").write_text(text)

    pattern_source = f'source: {{pattern: "{pattern}", z_start: 0, z_stop: {SHAPE[0]}}}'
    local_source = f'source: {{glob: "{stack}/*.png"}}'

    # the right key: the same recipe validates (the server accepts it; the refusals below
    # are the key's doing)
    recipe(pattern_source, "out")
    ok = _cli(folder, _env(home, server.env()), "validate", "recipe.yaml", timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"{SHAPE[0]} slices" in ok.stdout or "slices: 10" in ok.stdout, ok.stdout[-2000:]

    wrong = _env(home, server.env(S3_SECRET))
    unknown = _env(home, {**server.env(S3_SECRET), "AWS_ACCESS_KEY_ID": S3_KEY_ID})
    printed = ""
    cases = [
        (pattern_source, "out", wrong, "validate", "lab-em", "SignatureDoesNotMatch"),
        (pattern_source, "out", wrong, "run", "lab-em", "SignatureDoesNotMatch"),
        (local_source, "s3://lab-out/em", wrong, "validate", "lab-out", "SignatureDoesNotMatch"),
        (local_source, "s3://lab-out/em", unknown, "run", "lab-out", "InvalidAccessKeyId"),
    ]
    for source, output_dir, env, command, bucket, code in cases:
        recipe(source, output_dir)
        args = RUN if command == "run" else ("validate", "recipe.yaml")
        done = _cli(folder, env, *args, timeout=180)
        what = f"{command} {bucket} {code}"
        assert done.returncode == 2, (what, done.stderr[-3000:])
        line = _one_line(done.stderr, "access denied")
        assert line.startswith("emflow: ") and f"bucket '{bucket}'" in line, (what, line)
        assert server.endpoint in line and code in line, (what, line)
        assert "AWS_SECRET_ACCESS_KEY" in line and "AWS_PROFILE" in line, (what, line)
        printed += done.stdout + done.stderr
        # before any work: nothing here, no run folder copy, nothing in the bucket
        assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"], what
        assert not (home / "runs").exists(), what
    assert server.keys("lab-out") == []
    for secret in (S3_SECRET, S3_KEY_ID, server.secret):
        assert secret not in printed
        for p in _files(tmp_path):
            assert secret.encode() not in p.read_bytes(), (secret, p)


@pytest.mark.integration
def test_validate_names_a_missing_bucket_and_writes_nothing(
    stack: Path, s3: S3Server, tmp_path: Path
) -> None:
    """(``emflow run`` with a missing source or output bucket: tests/test_storage_sources.py.)"""
    env = _env(tmp_path / "home", {**s3_env(), "AWS_ENDPOINT_URL": s3.endpoint})
    for glob, output_dir, bucket in (
        ("s3://no-such-src-bucket/raw/*.png", "out", "no-such-src-bucket"),
        (str(stack / "*.png"), "s3://no-such-out-bucket/em", "no-such-out-bucket"),
    ):
        folder = tmp_path / bucket
        _write_recipe(folder, glob, output_dir)
        done = _cli(folder, env, "validate", "recipe.yaml", timeout=180)
        assert done.returncode == 2, done.stderr[-3000:]
        line = _one_line(done.stderr, "does not exist")
        assert f"bucket '{bucket}' does not exist" in line and "create it" in line, line
        assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]
    assert not (tmp_path / "home" / "runs").exists()


# ---------------------------------------------------------------------------------------
# an environment that would print credentials
# ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_verbose_curl_environment_is_refused_for_bucket_runs(
    stack: Path, s3: S3Server, tmp_path: Path
) -> None:
    """The danger is real (tensorstore prints the signed Authorization header with the key
    id); with a bucket source or output run/validate/plan refuse it naming the variable;
    a run that touches no bucket is not affected."""
    bucket = s3.bucket("leaky")
    s3.upload_dir(stack, bucket, "em/raw")
    base = _env(tmp_path / "home", {**s3_env(), "AWS_ENDPOINT_URL": s3.endpoint})
    code = (
        f"from emflow.io.location import Location; Location.of('s3://{bucket}/x').write('k', b'v')"
    )
    leak = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "TENSORSTORE_CURL_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert leak.returncode == 0 and f"Credential={S3_KEY_ID}" in leak.stderr, leak.stderr[-2000:]
    s3.client().delete_object(Bucket=bucket, Key="x/k")

    folder = tmp_path / "run"
    cases = [
        ("TENSORSTORE_CURL_VERBOSE", "1", f"s3://{bucket}/em/raw/*.png", "out", "run"),
        ("TENSORSTORE_VERBOSE_LOGGING", "s3,curl", str(stack / "*.png"), f"s3://{bucket}/o", "run"),
        ("TENSORSTORE_CURL_VERBOSE", "1", str(stack / "*.png"), f"s3://{bucket}/o", "validate"),
        ("TENSORSTORE_VERBOSE_LOGGING", "curl", f"s3://{bucket}/em/raw/*.png", "out", "plan"),
    ]
    printed = ""
    for name, value, glob, output_dir, command in cases:
        _write_recipe(folder, glob, output_dir)
        args = RUN if command == "run" else (command, "recipe.yaml")
        done = _cli(folder, {**base, name: value}, *args, timeout=180)
        assert done.returncode == 2, (name, command, done.stderr[-3000:])
        line = _one_line(done.stderr, name)
        assert line.startswith(f"emflow: error: {name} is set") and f"unset {name}" in line, line
        assert f"s3://{bucket}/" in line, line
        printed += done.stdout + done.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]
    assert S3_KEY_ID not in printed and "uthorization" not in printed
    assert s3.keys(bucket, "o/") == [] and not (tmp_path / "home" / "runs").exists()
    # no bucket: the variable changes nothing emflow does
    _write_recipe(folder, str(stack / "*.png"), "out")
    local = _cli(folder, {**base, "TENSORSTORE_CURL_VERBOSE": "1"}, "validate", "recipe.yaml")
    assert local.returncode == 0, local.stderr[-3000:]


def test_a_server_error_after_retries_is_resumable_and_says_so(
    auth_s3: AuthS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto (IAM on) answers an unsigned request with HTTP 500 (its own bug): a store that
    keeps failing with server errors is reported as such, exit 3, naming the endpoint."""
    from emflow.io import location, storage

    monkeypatch.setattr(storage, "_CURRENT", None)  # configure() below is undone after
    storage.configure(storage.resolve(endpoint=auth_s3.endpoint, anonymous=True, retries=2))
    with pytest.raises(location.StoreUnavailable) as err:
        location.Location.of("s3://lab-out/em").write("probe", b"x")
    text = str(err.value)
    assert err.value.exit_code == 3
    assert text.startswith(f"object store {auth_s3.endpoint} did not answer (server error HTTP 500")
    assert "2 attempts) while trying to write probe s3://lab-out/em" in text, text
    assert "<html" not in text
