"""Source slices from object stores and HTTP, end to end.

The same synthetic stack sits in a local folder, in an S3 bucket (moto's server), in a GCS
bucket (fake-gcs-server) and behind an HTTP server with byte ranges. ``emflow.discover``
finds the same catalogue from ``source.glob``/``directory`` URLs (listing) and from a
``pattern`` URL with a z range (plain HTTP cannot list; a missing slice is filled as the
recipe says). The real CLI, run on a local cluster with its credentials only in the
environment (``AWS_ENDPOINT_URL`` + keys), writes outputs from the S3 source that are
byte-identical to those of the local source; a source changed in the bucket is noticed on
the next run (object versions in the stack fingerprint).
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

from emflow.discover import discover
from emflow.errors import SourceError
from emflow.io import storage
from emflow.recipe import Source
from emflow.testing import synthetic_slices, write_stack
from tests.conftest import tree_digest
from tests.storage_servers import (
    GCS_TOKEN,
    S3_KEY_ID,
    S3_SECRET,
    GcsServer,
    HttpServer,
    S3Server,
    clean_env,
    s3_env,
)

SHAPE = (10, 96, 128)
RECIPE = """\
source: {{glob: "{glob}"}}
voxel_size_nm: [8, 8, 40]
align: false
output_dir: out
enhance: {{clip_limit: 0}}
outputs:
  - {{format: precomputed, name: ng, encoding: raw, chunk_size_xyz: [32, 32, 8]}}
  - {{format: omezarr, name: z5, chunk_size_xyz: [32, 32, 8]}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src-stack")
    write_stack(synthetic_slices(SHAPE, seed=4), root / "raw", pattern="s%03d.png")
    return root / "raw"


@pytest.fixture(scope="module")
def s3(stack: Path) -> Iterator[tuple[S3Server, str]]:
    with S3Server() as server:
        bucket = server.bucket()
        server.upload_dir(stack, bucket, "em/raw")
        server.put(bucket, "em/raw/sub/ignored.png", (stack / "s000.png").read_bytes())
        server.put(bucket, "em/raw/notes.txt", b"not a slice")
        yield server, bucket


@pytest.fixture(autouse=True)
def _settings(s3: tuple[S3Server, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    storage.configure(storage.resolve(endpoint=s3[0].endpoint, retries=2))
    yield
    storage._CURRENT = None


def _same(a, b) -> None:
    assert (a.shape_yx, a.dtype, a.missing) == (b.shape_yx, b.dtype, b.missing)
    assert [(r.z, r.source_z, r.page, r.fill) for r in a.slices] == [
        (r.z, r.source_z, r.page, r.fill) for r in b.slices
    ]
    names = [r.path.rsplit("/", 1)[-1] if r.path else None for r in a.slices]
    assert names == [Path(r.path).name if r.path else None for r in b.slices]


def test_glob_and_directory_urls_list_the_bucket(stack: Path, s3) -> None:
    _server, bucket = s3
    local = discover(Source(glob=str(stack / "*.png")))
    for src in (
        Source(glob=f"s3://{bucket}/em/raw/*.png"),
        Source(directory=f"s3://{bucket}/em/raw"),  # sub/ and notes.txt are not slices
    ):
        got = discover(src)
        _same(got, local)
        assert got.slices[0].path == f"s3://{bucket}/em/raw/s000.png"
    with pytest.raises(SourceError, match="no image files"):
        discover(Source(glob=f"s3://{bucket}/em/raw/*.tif"))
    with pytest.raises(SourceError, match="bucket 'no-such-src-bucket' does not exist"):
        discover(Source(directory="s3://no-such-src-bucket/raw"))


def test_gcs_directory_and_http_pattern(stack: Path, tmp_path: Path) -> None:
    gcs = GcsServer(tmp_path / "gcs")
    saved = {k: os.environ.get(k) for k in gcs.env()}
    os.environ.update(gcs.env())
    http = HttpServer(stack.parent)
    try:
        local = discover(Source(glob=str(stack / "*.png")))
        bucket = gcs.bucket()
        from emflow.io.location import Location

        dest = Location.of(f"gs://{bucket}/raw")
        for p in sorted(stack.glob("*.png")):
            dest.write(p.name, p.read_bytes())
        _same(discover(Source(directory=f"gs://{bucket}/raw")), local)
        # plain HTTP cannot list: a pattern with a z range; z 10 is missing and filled
        src = Source(pattern=f"{http.url}/raw/s%03d.png", z_start=0, z_stop=11, missing="fill_zero")
        got = discover(src)
        assert got.missing == (10,) and got.slices[10].fill == "zero"
        assert [r.path for r in got.slices[:10]] == [
            f"{http.url}/raw/s{z:03d}.png" for z in range(10)
        ]
        with pytest.raises(SourceError, match="cannot list its keys"):
            discover(Source(directory=f"{http.url}/raw"))
    finally:
        http.close()
        gcs.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(folder: Path, glob: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(RECIPE.format(glob=glob))
    proc = subprocess.Popen(
        [sys.executable, "-m", "emflow", "run", "recipe.yaml", "--dashboard", ":0",
         "--workers", "1", "--threads", "2"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _env(server: S3Server, home: Path) -> dict[str, str]:
    return clean_env(
        {
            **s3_env(),
            "AWS_ENDPOINT_URL": server.endpoint,
            "EMFLOW_STORE_RETRIES": "2",
            "HOME": str(home),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
    )


@pytest.fixture(scope="module")
def local_run(stack: Path, s3, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digests of the outputs of the same recipe on the local copy of the stack."""
    folder = tmp_path_factory.mktemp("local-run")
    done = _run(folder, str(stack / "*.png"), _env(s3[0], folder / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: tree_digest(folder / "out" / name) for name in ("ng", "z5")}


@pytest.mark.integration
def test_cli_run_from_an_s3_source_is_byte_identical_to_a_local_source(
    stack: Path, s3, local_run: dict, tmp_path: Path
) -> None:
    server, bucket = s3
    env = _env(server, tmp_path / "home")
    remote = _run(tmp_path / "remote", f"s3://{bucket}/em/raw/*.png", env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    for name, want in local_run.items():
        assert want and tree_digest(tmp_path / "remote" / "out" / name) == want, name
    assert S3_SECRET not in remote.stdout + remote.stderr
    # a slice replaced in the bucket: the next run sees a changed stack (its version changed)
    server.put(bucket, "em/raw/s003.png", (stack / "s004.png").read_bytes())
    try:
        again = _run(tmp_path / "remote", f"s3://{bucket}/em/raw/*.png", env)
    finally:
        server.put(bucket, "em/raw/s003.png", (stack / "s003.png").read_bytes())
    assert again.returncode == 2, again.stderr[-3000:]
    assert "modified" in again.stderr and "s003.png" in again.stderr


@pytest.mark.integration
def test_cli_unreachable_store_exits_3_naming_the_endpoint_then_runs(
    s3, local_run: dict, tmp_path: Path
) -> None:
    server, bucket = s3
    env = _env(server, tmp_path / "home")
    missing = _run(tmp_path / "missing", "s3://no-such-src-bucket/raw/*.png", env)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "bucket 'no-such-src-bucket' does not exist" in missing.stderr
    server.stop()
    try:
        down = _run(tmp_path / "run", f"s3://{bucket}/em/raw/*.png", env)
    finally:
        server.start()
    assert down.returncode == 3, down.stderr[-3000:]
    lines = [ln for ln in down.stderr.splitlines() if "did not answer" in ln]
    assert len(lines) == 1 and server.endpoint in lines[0], down.stderr[-3000:]
    assert "run the same command again" in lines[0] and "Traceback" not in down.stderr
    assert not (tmp_path / "run" / "out").exists()  # refused before any work
    again = _run(tmp_path / "run", f"s3://{bucket}/em/raw/*.png", env)
    assert again.returncode == 0, again.stderr[-3000:]
    for name, want in local_run.items():
        assert tree_digest(tmp_path / "run" / "out" / name) == want, name


def _bucket_digest(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    """Like tree_digest: every object under prefix/ but emflow's ownership marker."""
    return {k: v for k, v in server.digest(bucket, prefix).items() if k != ".emflow-output.json"}


def _start(folder: Path, env: dict[str, str], extra: dict[str, str] | None = None):
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", "run", "recipe.yaml", "--dashboard", ":0",
         "--workers", "1", "--threads", "2"],
        cwd=folder, env={**env, **(extra or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.mark.integration
def test_cli_s3_source_to_s3_outputs_resumes_after_sigkill_byte_identical(
    s3, local_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """output_dir in the bucket: nothing is written locally but the driver's run-folder copy;
    the driver is SIGKILLed while publishing (one output finalized, one not); the same
    command resumes and both outputs equal the local run's bytes."""
    from emflow import lattice as lat
    from emflow.io.runmirror import LOCAL_ONLY, local_dir_for

    server, bucket = s3
    cache = tmp_path / "runs"
    env = {**_env(server, tmp_path / "home"), "EMFLOW_RUN_CACHE": str(cache)}
    monkeypatch.setenv("EMFLOW_RUN_CACHE", str(cache))
    run_dir = local_dir_for(f"s3://{bucket}/out/emflow-run")
    folder = tmp_path / "run"
    folder.mkdir()
    text = RECIPE.format(glob=f"s3://{bucket}/em/raw/*.png")
    (folder / "recipe.yaml").write_text(
        text.replace("output_dir: out", f"output_dir: s3://{bucket}/out")
    )
    proc = _start(folder, env, {"EMFLOW_PAUSE_AFTER": "finalize:1"})
    try:
        deadline = time.monotonic() + 300
        while not any(
            r["event"] == "pause" and r.get("stage") == "finalize"
            for r in (lat.read_journal(run_dir) if run_dir.exists() else [])
        ):
            assert proc.poll() is None, _finish(proc)[1][-3000:]
            assert time.monotonic() < deadline, "the run never paused in finalize"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _finish(proc, 120)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "COMPLETE").exists()
    published = [n for n in ("ng", "z5") if server.keys(bucket, f"out/{n}/info") or
                 server.keys(bucket, f"out/{n}/zarr.json")]  # fmt: skip
    assert len(published) <= 1  # the kill landed before the second output was published
    again = _start(folder, env)
    _out, err = _finish(again)
    assert again.returncode == 0, err[-3000:]
    assert f"s3://{bucket}/out" in err
    for name, want in local_run.items():
        assert _bucket_digest(server, bucket, f"out/{name}") == want, name
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]  # nothing written here
    assert (run_dir / "COMPLETE").exists()
    # the run folder is the bucket's: the driver's copy went back at every stage boundary
    # (no secrets, no live-run file, no intermediates: tidied away once complete)
    in_bucket = {k.removeprefix("out/emflow-run/") for k in server.keys(bucket, "out/emflow-run/")}
    local = {
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
        if p.is_file() and p.relative_to(run_dir).parts[0] not in LOCAL_ONLY
    }  # fmt: skip
    assert in_bucket == local and "COMPLETE" in in_bucket and "run.json" in in_bucket
    assert server.get(bucket, "out/emflow-run/COMPLETE") == (run_dir / "COMPLETE").read_bytes()
    # the planted credentials: in no file the runs wrote (run folder: run.json, journal,
    # run.log, recipe, plan), no object in the bucket, nothing printed
    printed = err + _out
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.log" for p in files) and any(p.name == "run.json" for p in files)
    objects = [server.get(bucket, k) for k in server.keys(bucket, "out/")]
    for secret in (S3_SECRET, S3_KEY_ID):
        assert secret not in printed
        for blob in [p.read_bytes() for p in files] + objects:
            assert secret.encode() not in blob


@pytest.mark.integration
def test_s3_output_dir_refused_before_any_work_when_store_is_wrong(
    stack: Path, s3, tmp_path: Path
) -> None:
    """Missing bucket: exit 2 naming it; store down: exit 3 naming the endpoint; objects
    emflow did not write under an output name: exit 2. Nothing is written in any case."""
    server, bucket = s3
    env = {**_env(server, tmp_path / "home"), "EMFLOW_RUN_CACHE": str(tmp_path / "runs")}
    folder = tmp_path / "run"
    folder.mkdir()
    recipe = RECIPE.format(glob=str(stack / "*.png"))

    def run(output_dir: str) -> tuple[int, str]:
        (folder / "recipe.yaml").write_text(
            recipe.replace("output_dir: out", f"output_dir: {output_dir}")
        )
        proc = _start(folder, env)
        _out, err = _finish(proc, 300)
        return proc.returncode, err

    code, err = run("s3://no-such-out-bucket/em")
    assert code == 2 and "bucket 'no-such-out-bucket' does not exist" in err, err[-3000:]
    server.put(bucket, "foreign/ng/data.bin", b"someone else's")
    code, err = run(f"s3://{bucket}/foreign")
    assert code == 2 and f"s3://{bucket}/foreign/ng already exists" in err, err[-3000:]
    assert server.keys(bucket, "foreign/") == ["foreign/ng/data.bin"]
    server.stop()
    try:
        code, err = run(f"s3://{bucket}/later")
    finally:
        server.start()
    assert code == 3, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "did not answer" in ln]
    assert server.endpoint in line and "Traceback" not in err
    assert not server.keys(bucket, "later/")
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in folder.iterdir()) == [
        "recipe.yaml"
    ]


def test_readme_bucket_recipe_is_valid() -> None:
    """The README's bucket lines are recipe fields as written (a URL source and output_dir)."""
    import re

    import yaml

    from emflow.recipe import recipe_from_dict

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Buckets.*?```yaml\n(.*?)```", readme, re.S).group(1)
    data = yaml.safe_load(block)
    r = recipe_from_dict({**data, "voxel_size_nm": [4, 4, 40], "outputs": [{"format": "omezarr"}]})
    assert r.output_remote and r.output_root == "s3://em-lab/aligned"
    assert r.source.glob == "s3://em-lab/raw/*.png"
    assert "emflow-run" in str(r.run_folder) and "s3:" not in str(r.run_folder.parent.parent)


@pytest.mark.integration
def test_cli_run_to_gcs_outputs_is_byte_identical_to_a_local_run(
    stack: Path, s3, local_run: dict, tmp_path: Path
) -> None:
    """output_dir gs://: fake-gcs-server reached through TENSORSTORE_GCS_HTTP_URL."""
    server, _ = s3
    gcs = GcsServer(tmp_path / "gcs")
    try:
        bucket = gcs.bucket()
        env = {
            **_env(server, tmp_path / "home"),
            **gcs.env(),
            "EMFLOW_RUN_CACHE": str(tmp_path / "runs"),
        }
        folder = tmp_path / "run"
        folder.mkdir()
        text = RECIPE.format(glob=str(stack / "*.png"))
        (folder / "recipe.yaml").write_text(
            text.replace("output_dir: out", f"output_dir: gs://{bucket}/out")
        )
        proc = _start(folder, env)
        _out, err = _finish(proc)
        assert proc.returncode == 0, err[-3000:]
        for name, want in local_run.items():
            got = gcs.digest(bucket, f"out/{name}")
            got.pop(".emflow-output.json")
            assert got == want, name
        assert GCS_TOKEN not in err
    finally:
        gcs.stop()
