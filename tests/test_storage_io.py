"""Object-store plumbing against real servers: moto's S3 API, fake-gcs-server, an HTTP server.

Locations (specs, operations, credentials by reference), source readers (headers by byte
range, slices decoded in memory), every output layout written to s3:// and gs:// with the
same bytes as a local write and no metadata before finalize, the run-folder mirror, and
the one-line errors of an unreachable store or a missing bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from emflow.errors import SourceError
from emflow.io import remote, storage
from emflow.io.location import Location, StoreAccessError, StoreUnavailable, classify
from tests.storage_servers import (
    S3_KEY_ID,
    S3_SECRET,
    GcsServer,
    HttpServer,
    S3Server,
    clean_env,
    s3_env,
)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    server = GcsServer(tmp_path_factory.mktemp("gcs"))
    # tensorstore's GCS auth is made once per process, on first use: set it before any
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _settings(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in s3_env():
        monkeypatch.setenv(k, s3_env()[k])
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    storage.configure(storage.resolve(endpoint=s3.endpoint, retries=2))
    yield
    storage._CURRENT = None


# ---------------------------------------------------------------------------------------
# specs and credentials
# ---------------------------------------------------------------------------------------
def test_s3_spec_names_endpoint_region_and_a_credential_type_never_a_key(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint + "/")  # the trailing / is dropped
    storage.configure(storage.resolve())
    spec = Location.of("s3://bkt/a/b/").kvstore
    assert spec["endpoint"] == s3.endpoint and spec["aws_region"] == "us-east-1"
    assert spec["bucket"] == "bkt" and spec["path"] == "a/b/"
    assert spec["context"]["aws_credentials"] == {"type": "environment"}
    text = json.dumps(spec)
    assert S3_KEY_ID not in text and S3_SECRET not in text
    # a named profile (recipe or AWS_PROFILE) wins; anonymous for public buckets, per bucket
    storage.configure(storage.resolve(profile="lab", buckets={"open-data": {"anonymous": True}}))
    assert Location.of("s3://bkt/x").kvstore["context"]["aws_credentials"] == {
        "type": "default",
        "profile": "lab",
    }
    assert Location.of("s3://open-data/x").kvstore["context"]["aws_credentials"] == {
        "type": "anonymous"
    }
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure(storage.resolve(region="eu-west-1"))
    spec = Location.of("s3://bkt/x").kvstore
    assert "endpoint" not in spec and spec["aws_region"] == "eu-west-1"
    assert spec["context"]["aws_credentials"] == {"type": "default", "profile": "default"}


def test_profile_from_a_credentials_file_reaches_the_store(s3: S3Server, tmp_path: Path) -> None:
    """AWS_PROFILE + AWS_SHARED_CREDENTIALS_FILE, as the AWS CLI reads them (no keys in env)."""
    bucket = s3.bucket()
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[lab]\naws_access_key_id = {S3_KEY_ID}\naws_secret_access_key = {S3_SECRET}\n"
    )
    (tmp_path / "config").write_text("[profile lab]\nregion = us-east-1\n")
    code = (
        "from emflow.io import storage; from emflow.io.location import Location;"
        "storage.configure(storage.resolve());"
        f"loc = Location.of('s3://{bucket}/p'); loc.write('k', b'v');"
        "print(loc.kvstore['context']['aws_credentials'], loc.read('k'))"
    )
    env = clean_env(
        {
            "AWS_PROFILE": "lab",
            "AWS_SHARED_CREDENTIALS_FILE": str(creds),
            "AWS_CONFIG_FILE": str(tmp_path / "config"),
            "AWS_ENDPOINT_URL": s3.endpoint,
            "HOME": str(tmp_path),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "{'type': 'default', 'profile': 'lab'} b'v'" in out.stdout
    assert S3_SECRET not in out.stdout + out.stderr


def test_leaky_tensorstore_logging_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.leaky_environment() is None
    monkeypatch.setenv("TENSORSTORE_VERBOSE_LOGGING", "s3=1,http=1")  # these redact headers
    assert storage.leaky_environment() is None
    monkeypatch.setenv("TENSORSTORE_VERBOSE_LOGGING", "s3=1,curl")
    assert storage.leaky_environment() == "TENSORSTORE_VERBOSE_LOGGING"
    monkeypatch.delenv("TENSORSTORE_VERBOSE_LOGGING")
    monkeypatch.setenv("TENSORSTORE_CURL_VERBOSE", "1")
    assert storage.leaky_environment() == "TENSORSTORE_CURL_VERBOSE"


# ---------------------------------------------------------------------------------------
# operations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["s3", "gs", "file"])
def test_location_operations(scheme: str, s3: S3Server, gcs: GcsServer, tmp_path: Path) -> None:
    if scheme == "s3":
        loc = Location.of(f"s3://{s3.bucket()}/run/a")
    elif scheme == "gs":
        loc = Location.of(f"gs://{gcs.bucket()}/run/a")
    else:
        loc = Location.of(tmp_path / "run" / "a")
    loc.write("done/slab/3.json", b'{"result": 1}')
    loc.write("blob", bytes(range(200)))
    loc.write("deep/er/x", b"x")
    assert loc.list() == ["blob", "deep/er/x", "done/slab/3.json"]
    assert loc.list("done/") == ["done/slab/3.json"]
    assert loc.read("blob") == bytes(range(200))
    assert loc.read_range("blob", 10, 20) == bytes(range(10, 20))
    assert loc.read_range("blob", 190, 400) == bytes(range(190, 200))  # clipped at the end
    assert loc.read_range("blob", -5, None) == bytes(range(195, 200))
    assert loc.read("nothing") is None
    loc.delete("blob")
    loc.delete_all("deep/")
    assert loc.list() == ["done/slab/3.json"]
    assert loc.child("done").child("slab").read("3.json") == b'{"result": 1}'


def test_http_location_reads_and_cannot_list(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(bytes(range(100)))
    http = HttpServer(tmp_path)
    try:
        loc = Location.of(f"{http.url}/d/")
        assert loc.read("f.bin") == bytes(range(100))
        assert loc.read_range("f.bin", 90, 200) == bytes(range(90, 100))
        assert loc.read("missing.bin") is None
        with pytest.raises(Exception, match="cannot list its keys"):
            loc.list()
    finally:
        http.close()


def test_missing_bucket_and_unreachable_store_are_one_line_errors(s3: S3Server) -> None:
    missing = Location.of("s3://no-such-bucket-here/out")
    with pytest.raises(StoreAccessError) as err:
        missing.write("probe", b"")
    assert "bucket 'no-such-bucket-here' does not exist" in str(err.value)
    assert s3.endpoint in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2
    bucket = s3.bucket()
    loc = Location.of(f"s3://{bucket}/x")
    loc.write("k", b"v")
    s3.stop()
    try:
        with pytest.raises(StoreUnavailable) as err:
            loc.read("k")
        text = str(err.value)
        assert text.startswith(f"object store {s3.endpoint} did not answer (connection refused")
        assert "run the same command again" in text and "\n" not in text
        assert err.value.exit_code == 3
        # what a worker sees (no Location): classified from tensorstore's text alone
        try:
            import tensorstore as ts

            ts.KvStore.open(loc.kvstore).result().read("k").result()
        except ValueError as exc:
            worker_err = classify(exc)
        assert isinstance(worker_err, StoreUnavailable)
        assert s3.endpoint in str(worker_err)
    finally:
        s3.start()
    assert loc.read("k") == b"v"  # the restarted server kept its buckets


# ---------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    a8 = rng.integers(0, 255, (120, 170), np.uint8)
    a16 = rng.integers(0, 65535, (120, 170), np.uint16)
    cv2.imwrite(str(d / "a.png"), a8)
    cv2.imwrite(str(d / "b.png"), a16)
    cv2.imwrite(str(d / "c.jpg"), a8)
    tifffile.imwrite(d / "d.tif", a16)
    tifffile.imwrite(d / "e.tif", np.stack([a8, a8[::-1]]), compression="zlib")
    tifffile.imwrite(
        d / "f.tif", np.stack([a16, a16[::-1], a16[:, ::-1]]), photometric="minisblack"
    )
    (d / "trunc.png").write_bytes((d / "a.png").read_bytes()[:-30])
    return d


def _expected(path: Path, page: int) -> np.ndarray:
    if path.suffix == ".tif":
        return tifffile.imread(path, key=page)
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("where", ["s3", "http"])
def test_remote_slices_headers_and_pixels(where: str, s3: S3Server, images: Path) -> None:
    http = None
    if where == "s3":
        bucket = s3.bucket()
        s3.upload_dir(images, bucket, "stack")
        base = f"s3://{bucket}/stack"
    else:
        http = HttpServer(images)
        base = http.url
    try:
        for name, pages, dtype in (
            ("a.png", 1, "uint8"),
            ("b.png", 1, "uint16"),
            ("c.jpg", 1, "uint8"),
            ("d.tif", 1, "uint16"),
            ("e.tif", 2, "uint8"),
            ("f.tif", 3, "uint16"),
        ):
            h = remote.read_header(f"{base}/{name}")
            assert (h.pages, h.shape_yx, h.dtype) == (pages, (120, 170), dtype), name
            for page in range(pages):
                got = remote.read_image(f"{base}/{name}", page)
                np.testing.assert_array_equal(got, _expected(images / name, page))
        with pytest.raises(SourceError, match="truncated"):
            remote.read_header(f"{base}/trunc.png")
        with pytest.raises(SourceError, match="does not exist"):
            remote.read_image(f"{base}/gone.png")
        if where == "s3":
            got = remote.list_files(base, "*.tif")
            assert got == [f"{base}/d.tif", f"{base}/e.tif", f"{base}/f.tif"]
    finally:
        if http is not None:
            http.close()


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
OUTPUTS = [
    {"format": "precomputed", "name": "jpeg_sharded", "encoding": "jpeg", "sharded": True},
    {"format": "precomputed", "name": "raw_sharded", "encoding": "raw", "sharded": True},
    {"format": "precomputed", "name": "raw_chunks", "encoding": "raw", "sharded": False},
    {"format": "omezarr", "name": "v05", "version": "0.5"},
    {"format": "omezarr", "name": "v04", "version": "0.4"},
]


def _write(writers: list, plan, data: np.ndarray, *, finalize: bool = True) -> None:
    for w in writers:
        w.create()
        for lev in plan.levels:
            f = lev.factor_zyx
            block = data[:: f[0], :: f[1], :: f[2]]
            block = block[: lev.shape_zyx[0], : lev.shape_zyx[1], : lev.shape_zyx[2]].copy()
            w.write(lev.index, (0, 0, 0), block).result()
        if finalize:
            w.finalize()


def _local_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_every_layout_is_byte_identical_and_invisible_until_finalized(
    scheme: str, s3: S3Server, gcs: GcsServer, tmp_path: Path
) -> None:
    from emflow.plan import make_writers, plan_output
    from emflow.recipe import recipe_from_dict

    outputs = [{**o, "chunk_size_xyz": [32, 32, 8]} for o in OUTPUTS]
    recipe = recipe_from_dict(
        {
            "source": {"glob": "*.png"},
            "voxel_size_nm": [4, 4, 40],
            "output_dir": str(tmp_path),
            "outputs": outputs,
            "align": False,
        }
    )
    plan = plan_output(recipe, 16, (96, 120), "uint8")
    data = np.random.default_rng(3).integers(0, 255, (16, 96, 120), np.uint8)
    _write(make_writers(recipe, plan, tmp_path, token="local"), plan, data)
    server = s3 if scheme == "s3" else gcs
    bucket = server.bucket()
    writers = [
        dataclasses.replace(w, path=f"{scheme}://{bucket}/out/{w.name}")
        for w in make_writers(recipe, plan, tmp_path, token="remote")
    ]
    _write(writers, plan, data, finalize=False)
    for w in writers:  # chunks only: no reader finds a volume yet
        names = {k.rsplit("/", 1)[-1] for k in server.keys(bucket, f"out/{w.name}/")}
        assert names and not names & {"info", "zarr.json", ".zarray", ".zattrs", ".zgroup"}
        with pytest.raises(Exception):  # noqa: B017 - tensorstore's NOT_FOUND
            import emflow

            emflow.open(f"{scheme}://{bucket}/out/{w.name}")
    for w in writers:
        w.finalize()
    for w in writers:
        local = _local_digest(tmp_path / f"{w.name}.partial")
        assert server.digest(bucket, f"out/{w.name}") == local, w.name
    import emflow

    back = emflow.open(f"{scheme}://{bucket}/out/raw_chunks", level=0)
    np.testing.assert_array_equal(np.asarray(back.values), data)


# ---------------------------------------------------------------------------------------
# the run folder's mirror
# ---------------------------------------------------------------------------------------
def test_run_folder_mirror_restores_and_flushes_in_order(s3: S3Server, tmp_path: Path) -> None:
    from emflow.io.runmirror import RunMirror

    bucket = s3.bucket()
    remote_run = Location.of(f"s3://{bucket}/out/emflow-run")
    local = tmp_path / "copy" / "emflow-run"
    m = RunMirror(remote_run, local)
    assert m.restore() == 0 and local.is_dir()
    (local / "run.json").write_text('{"fingerprint": "f"}')
    (local / "done" / "slab").mkdir(parents=True)
    for i in range(5):
        (local / "done" / "slab" / f"{i}.json").write_text(f'{{"result": {i}}}')
    (local / "secrets").mkdir()
    (local / "secrets" / "client-key.pem").write_text("PRIVATE")
    (local / "scheduler.json").write_text("{}")
    (local / ".run.json.abc.tmp").write_text("half")
    m.flush()
    keys = s3.keys(bucket, "out/emflow-run/")
    assert keys == [f"out/emflow-run/done/slab/{i}.json" for i in range(5)] + [
        "out/emflow-run/run.json"
    ]  # nothing local-only, no temporary file
    # a dropped stage is deleted in the bucket; the rest stays
    import shutil

    shutil.rmtree(local / "done" / "slab")
    (local / "done" / "coarse1").mkdir()
    (local / "done" / "coarse1" / "0.json").write_text('{"result": 0}')
    m.flush()
    assert s3.keys(bucket, "out/emflow-run/done/") == ["out/emflow-run/done/coarse1/0.json"]
    # another machine: the local copy is rebuilt from the bucket (its own secrets are kept)
    other = RunMirror(remote_run, tmp_path / "other" / "emflow-run")
    (other.local / "secrets").mkdir(parents=True)
    (other.local / "done" / "slab").mkdir(parents=True)
    (other.local / "done" / "slab" / "9.json").write_text("stale")
    assert other.restore() == 2
    found = sorted(str(p.relative_to(other.local)) for p in other.local.rglob("*") if p.is_file())
    assert found == ["done/coarse1/0.json", "run.json"]
    assert (other.local / "secrets").is_dir()


# ---------------------------------------------------------------------------------------
# run-folder intermediates workers write to a bucket (hand-offs, rendered slices, cache)
# ---------------------------------------------------------------------------------------
def test_intermediates_round_trip_through_a_bucket(s3: S3Server) -> None:
    from emflow.io import rendercache, slicecache
    from emflow.io.handoff import HandoffArray

    bucket = s3.bucket()
    base = f"s3://{bucket}/out/emflow-run"
    rng = np.random.default_rng(11)
    image = rng.integers(0, 65535, (40, 50), np.uint16)
    slicecache.store_slice(f"{base}/slice-cache", 7, image)
    got = slicecache.load_slice(f"{base}/slice-cache", 7, (40, 50), np.dtype("uint16"))
    np.testing.assert_array_equal(got, image)
    assert slicecache.load_slice(f"{base}/slice-cache", 8, (40, 50), np.dtype("uint16")) is None
    rendered = rng.integers(0, 255, (40, 50), np.uint8)
    rendercache.store_slice(f"{base}/rendered", 3, rendered)
    out = np.zeros((10, 20), np.uint8)
    rendercache.read_window(f"{base}/rendered", 3, (40, 50), np.uint8, (5, 15, 30, 50), out)
    np.testing.assert_array_equal(out, rendered[5:15, 30:50])
    assert s3.keys(bucket, "out/emflow-run/rendered/") == ["out/emflow-run/rendered/z000003.raw"]
    sums = HandoffArray(f"{base}/handoff/level1", (4, 40, 50), "uint32", (2, 40, 50), "t1")
    assert not sums.exists()
    sums.create()
    block = rng.integers(0, 2**20, (2, 40, 50), np.uint32)
    sums.write((2, 0, 0), block).result()
    assert sums.exists()
    np.testing.assert_array_equal(sums.read((2, 4, 10, 20, 0, 50)), block[:, 10:20])
    np.testing.assert_array_equal(sums.read((0, 2, 0, 40, 0, 50)), 0)  # never written: fill
    sums2 = HandoffArray(f"{base}/handoff/level1", (4, 40, 50), "uint32", (2, 40, 50), "t2")
    sums2.create()  # a recreated hand-off starts empty (the old objects are deleted)
    np.testing.assert_array_equal(sums2.read((2, 4, 0, 40, 0, 50)), 0)


def test_throughput_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/storage_throughput.py runs end to end on a tiny volume (no speed asserted)."""
    from benchmarks import storage_throughput

    got = storage_throughput.main(["--shape", "8", "128", "128", "--repeat", "1"])
    assert got["bytes"] == 8 * 128 * 128 and got["ratio_s3_over_local"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
