"""Credentials are never stored or printed: a planted secret is searched for everywhere.

A child process gets recognisable fake credentials the way users provide them (AWS keys
and a session token in its environment, a GCS bearer token) plus
``TENSORSTORE_VERBOSE_LOGGING=s3,gcs_http`` (tensorstore's request logging, which redacts
headers), then does what a run does with object stores: reads source slices from S3,
writes every output layout to S3 and GCS (chunks, then metadata), opens the result with
``emflow.open``, pickles an output array as Dask ships it to workers, renders a Kubernetes
spec whose pods get credentials from a Secret, and hits a missing bucket and an unreachable
endpoint (printing the one-line errors). Afterwards every byte it printed, every file under
its HOME and temporary folders, and every object key and value in both buckets are scanned
for the planted values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage_servers import (
    GCS_TOKEN,
    S3_KEY_ID,
    S3_SECRET,
    GcsServer,
    S3Server,
    clean_env,
    free_port,
)

SESSION_TOKEN = "FQoGZXIvYXdzEMFLOWPLANTEDsessionTOKEN0123456789"

CHILD = r"""
import json, logging, os, pickle, sys
from pathlib import Path
import numpy as np, cv2
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every emflow log record
import emflow
from emflow.io import remote, storage
from emflow.io.location import Location
from emflow.plan import make_writers, plan_output
from emflow.recipe import recipe_from_dict

s3_bucket, gs_bucket, work, dead_port = sys.argv[1:5]
work = Path(work)
storage.configure(storage.resolve(retries=2))  # endpoint from AWS_ENDPOINT_URL
print("settings", json.dumps(storage.current().to_json()))
rng = np.random.default_rng(5)
data = rng.integers(0, 255, (8, 64, 80), np.uint8)
src = Location.of(f"s3://{s3_bucket}/raw")
for z in range(data.shape[0]):
    ok, png = cv2.imencode(".png", data[z])
    src.write(f"s{z:03d}.png", png.tobytes())
urls = remote.list_files(src.url, "*.png")
print("source", urls[0], remote.read_header(urls[0]))
stack = np.stack([remote.read_image(u) for u in urls])
assert (stack == data).all()
outputs = [
    {"format": "precomputed", "name": "ng", "encoding": "raw", "sharded": True,
     "chunk_size_xyz": [32, 32, 8]},
    {"format": "omezarr", "name": "zarr", "version": "0.5", "chunk_size_xyz": [32, 32, 8]},
]
recipe = recipe_from_dict({"source": {"glob": "*.png"}, "voxel_size_nm": [4, 4, 40],
    "output_dir": str(work / "local"), "outputs": outputs, "align": False})
plan = plan_output(recipe, 8, (64, 80), "uint8")
import dataclasses
for scheme, bucket in (("s3", s3_bucket), ("gs", gs_bucket)):
    for w in make_writers(recipe, plan, work / "local", token=scheme):
        w = dataclasses.replace(w, path=f"{scheme}://{bucket}/out/{w.name}")
        w.create()
        for lev in plan.levels:
            f = lev.factor_zyx
            block = data[:: f[0], :: f[1], :: f[2]][: lev.shape_zyx[0], : lev.shape_zyx[1],
                                                    : lev.shape_zyx[2]].copy()
            w.write(lev.index, (0, 0, 0), block).result()
        (work / f"{scheme}-{w.name}.pickle").write_bytes(pickle.dumps(w._store(0)))
        w.finalize()
        vol = emflow.open(f"{scheme}://{bucket}/out/{w.name}", level=0)
        print(repr(vol))
        assert (np.asarray(vol.values) == data).all()
from emflow.cluster import ClusterRequest
from emflow.cluster.kubernetes import kubernetes_spec
import yaml
cfg = work / "k8s.yaml"
cfg.write_text("image: registry.example.org/lab/emflow:1\npod:\n  envFrom: [{secretRef: {name: emflow-s3}}]\n")
spec = kubernetes_spec(ClusterRequest(kind="kubernetes", config_path=cfg))
(work / "daskcluster.yaml").write_text(yaml.safe_dump(spec))
print(yaml.safe_dump(spec))
for what, loc in (("missing", Location.of("s3://no-such-bucket-planted/x")),):
    try:
        loc.write("probe", b"")
    except Exception as exc:
        print("error:", exc)
storage.configure(storage.resolve(endpoint=f"http://127.0.0.1:{dead_port}", retries=2))
try:
    Location.of(f"s3://{s3_bucket}/out").read("ng/info")
except Exception as exc:
    print("error:", exc)
print("CHILD DONE")
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, GcsServer]]:
    s3 = S3Server()
    try:
        gcs = GcsServer(tmp_path_factory.mktemp("gcs-secrets"))
    except BaseException:
        s3.stop()
        raise
    try:
        yield s3, gcs
    finally:
        gcs.stop()
        s3.stop()


def _files(root: Path) -> Iterator[Path]:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            yield p


def test_planted_credentials_appear_in_no_file_object_or_output(
    servers: tuple[S3Server, GcsServer], tmp_path: Path
) -> None:
    s3, gcs = servers
    s3_bucket, gs_bucket = s3.bucket(), gcs.bucket()
    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for d in (home, work, tmp):
        d.mkdir()
    env = clean_env(
        {
            "AWS_ACCESS_KEY_ID": S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_SESSION_TOKEN": SESSION_TOKEN,
            "AWS_ENDPOINT_URL": s3.endpoint,
            **gcs.env(),
            "TENSORSTORE_VERBOSE_LOGGING": "s3,gcs_http",
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "EMFLOW_RUN_CACHE": str(home / "runs"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, s3_bucket, gs_bucket, str(work), str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    printed = out.stdout + out.stderr
    assert out.returncode == 0 and "CHILD DONE" in out.stdout, printed[-4000:]
    # the child really did the work: sources read, both stores hold both outputs
    assert "source s3://" in out.stdout and "envFrom" in out.stdout
    assert "bucket 'no-such-bucket-planted' does not exist" in out.stdout
    assert "did not answer (connection refused" in out.stdout
    s3_keys = s3.keys(s3_bucket)
    gs_keys = gcs.keys(gs_bucket)
    for keys in (s3_keys, gs_keys):
        assert {"out/ng/info", "out/zarr/zarr.json"} <= set(keys)
    written = {str(p): p.read_bytes() for root in (home, work, tmp) for p in _files(root)}
    assert any(p.endswith(".pickle") for p in written) and any("daskcluster" in p for p in written)
    objects = {f"s3:{k}": s3.get(s3_bucket, k) for k in s3_keys}
    objects.update({f"gs:{k}": gcs.get(gs_bucket, k) for k in gs_keys})
    for secret in (S3_SECRET, SESSION_TOKEN, GCS_TOKEN, S3_KEY_ID):
        assert secret not in printed, f"{secret!r} printed"
        needle = secret.encode()
        for where, blob in (*written.items(), *objects.items()):
            assert needle not in blob and needle not in where.encode(), f"{secret!r} in {where}"
