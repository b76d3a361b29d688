"""A Kubernetes run with no shared disk, emulated: only the object store is shared.

The scheduler and worker "pods" are started from the DaskCluster spec's own commands
(``kubernetes_spec``, as in tests/test_cluster_kubernetes.py), each in its own empty working
folder with its own HOME and TMPDIR; their object-store credentials come from an emulated
``pod.envFrom`` Secret. The source stack, the outputs and the run folder all live in a moto
S3 bucket. The driver is the real CLI (``emflow run --cluster tls://...``) in yet another
folder, with its run-folder working copy under ``$EMFLOW_RUN_CACHE``.

What must hold:

* the driver is SIGKILLed mid-run (held at the pyramid stage) and the same command, run from
  a *different* empty driver folder and cache, resumes from the bucket's run folder: the
  stages done before the kill are skipped, the outputs in the bucket are byte-identical to a
  serial local run;
* no pod folder and no driver folder other than the driver's run cache received run data
  (markers, journal, features, slice cache, hand-offs, volumes): workers read and write only
  the bucket; the bucket's run folder holds the run (no intermediates once complete).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("dask_kubernetes")

from emflow.cluster import K8S_TLS_DIR, ClusterRequest, kubernetes_spec
from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.conftest import tree_digest
from tests.storage_servers import S3_KEY_ID, S3_SECRET, S3Server, clean_env, s3_env
from tests.test_cluster_kubernetes import _Pods

SHAPE = (8, 128, 128)
#: names that are run data: markers, journal, run records, intermediates, volume metadata
RUN_DATA_NAMES = {
    "journal.jsonl", "run.json", "outputs.json", "plan.json", "stack.json", "alignment.json",
    "COMPLETE", "zarr.json", "info", ".emflow-output.json", "recipe.resolved.yaml",
}  # fmt: skip
RUN_DATA_PARTS = {"done", "handoff", "features", "slice-cache", "rendered", "emflow-run", "qc"}
RUN_DATA_SUFFIXES = (".npz", ".zst", ".raw")


class _IsolatedPods(_Pods):
    """Pods that share nothing but the network: each in its own folder, HOME and TMPDIR, with
    the environment of the spec plus its ``pod.envFrom`` Secrets (``secrets``: name → data)."""

    def __init__(self, spec: dict[str, Any], workdir: Path, secrets: dict[str, dict]) -> None:
        self.secrets = secrets
        self.folders: list[Path] = []
        self.envs: list[dict[str, str]] = []
        super().__init__(spec, workdir)

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        from tests.test_cluster_kubernetes import _env as spec_env

        env = {k: v for k, v in clean_env().items() if not k.startswith("DASK_")}
        for k, v in spec_env(container).items():  # the container's env, TLS files "mounted"
            env[k] = v.replace(K8S_TLS_DIR, str(self.tls_dir))
        for source in container.get("envFrom") or []:
            env.update(self.secrets[source["secretRef"]["name"]])
        return env

    def _start(self, argv: list[str], env: dict[str, str], name: str) -> None:
        folder = self.workdir / name
        (folder / "tmp").mkdir(parents=True)
        self.folders.append(folder)
        env = {**env, "HOME": str(folder), "TMPDIR": str(folder / "tmp")}
        self.envs.append(env)
        log = open(self.workdir / f"{name}.log", "wb")  # the pod's stdout: `kubectl logs`
        self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=folder,
                                           start_new_session=True))  # fmt: skip


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[_IsolatedPods]:
    tmp = tmp_path_factory.mktemp("k8s-nodisk")
    site = tmp / "k8s.yaml"
    # no endpoint in the pods' environment: it reaches them from the recipe's storage section
    site.write_text(
        "name: em\nn_workers: 2\nenv: {OMP_NUM_THREADS: '1'}\n"
        "pod: {envFrom: [{secretRef: {name: emflow-s3}}]}\n"
    )
    spec = kubernetes_spec(ClusterRequest("kubernetes", config_path=site, threads_per_worker=1,
                                          memory_per_worker="1GiB"))  # fmt: skip
    p = _IsolatedPods(spec, tmp / "pods", {"emflow-s3": s3_env()})
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    """The source stack in a local folder, and the digests of a serial local run's outputs."""
    from emflow import api

    tmp = tmp_path_factory.mktemp("nodisk-stack")
    write_stack(synthetic_slices(SHAPE, seed=3), tmp / "raw", pattern="s%03d.png")
    api.run(_recipe(str(tmp / "raw" / "*.png"), str(tmp / "reference")), progress=False)
    return tmp / "raw", {name: tree_digest(tmp / "reference" / name) for name in ("ng", "z5")}


def _recipe(source: str, output_dir: str, **storage: Any) -> dict[str, Any]:
    return {
        **({"storage": storage} if storage else {}),
        "source": {"glob": source},
        "voxel_size_nm": [8, 8, 40],
        "output_dir": output_dir,
        "outputs": [
            {"format": "precomputed", "name": "ng", "encoding": "raw", "sharded": True,
             "chunk_size_xyz": [64, 64, 4]},
            {"format": "omezarr", "name": "z5", "chunk_size_xyz": [64, 64, 4]},
        ],
        "run": {"slab_depth": 4},
    }  # fmt: skip


def _driver(folder: Path, cache: Path, pods: _IsolatedPods, recipe: dict, env: dict[str, str],
            extra: dict[str, str] | None = None) -> subprocess.Popen[str]:  # fmt: skip
    """`emflow run --cluster tls://<scheduler>` from ``folder`` (its own HOME and run cache)."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    tls = pods.tls_dir
    (folder / "cluster.yaml").write_text(yaml.safe_dump({"security": {
        "tls_ca_file": str(tls / "ca.pem"), "tls_client_cert": str(tls / "tls.crt"),
        "tls_client_key": str(tls / "tls.key"), "require_encryption": True,
    }}))  # fmt: skip
    env = {**env, "HOME": str(folder), "EMFLOW_RUN_CACHE": str(cache), **(extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "emflow", "run", "recipe.yaml", "--cluster", pods.address,
         "--cluster-config", "cluster.yaml", "--dashboard", ":0", "-q"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _run_data(root: Path) -> list[str]:
    """Files under ``root`` that are run data (see RUN_DATA_*)."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and (
            p.name in RUN_DATA_NAMES
            or p.name.endswith(RUN_DATA_SUFFIXES)
            or RUN_DATA_PARTS & set(rel.parts[:-1])
        ):
            out.append(str(rel))
    return sorted(out)


@pytest.mark.integration
def test_no_shared_disk_run_resumes_from_the_bucket_byte_identical(
    pods: _IsolatedPods, s3: S3Server, stack: tuple[Path, dict], tmp_path: Path
) -> None:
    """(See the module docstring.) The endpoint is only in the recipe (storage.endpoint): no
    process has AWS_ENDPOINT_URL; the pods get it from the driver's worker plugin."""
    from emflow import lattice as lat
    from emflow.io import runmirror

    folder, reference = stack
    bucket = s3.bucket()
    s3.upload_dir(folder, bucket, "em/raw")
    recipe = _recipe(
        f"s3://{bucket}/em/raw/*.png", f"s3://{bucket}/out", endpoint=s3.endpoint, retries=3
    )
    env = clean_env(s3_env())  # keys only, as a Secret gives them; no endpoint
    assert not any(k.startswith("AWS_ENDPOINT") for k in env)
    for proc_env in pods.envs:
        assert not any(k.startswith("AWS_ENDPOINT") for k in proc_env)
    cache1, cache2 = tmp_path / "driver1-cache", tmp_path / "driver2-cache"

    # 1. the driver, held once the pyramid stage began, then SIGKILLed (process group)
    first = _driver(
        tmp_path / "driver1", cache1, pods, recipe, env, {"EMFLOW_PAUSE_AFTER": "slab:1"}
    )
    try:
        deadline = time.monotonic() + 240
        journal = lambda: [r for d in cache1.glob("*/emflow-run") for r in lat.read_journal(d)]  # noqa: E731
        while not any(r["event"] == "pause" and r.get("stage") == "slab" for r in journal()):
            assert first.poll() is None, clirun.outputs(first)[1][-3000:]
            assert time.monotonic() < deadline, "the run never held at slab"
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    clirun.outputs(first, 60)
    assert first.returncode == -signal.SIGKILL
    run_keys = s3.keys(bucket, "out/emflow-run/")
    # the bucket's run folder vouches for the alignment stages; their intermediates are there
    assert any(k.startswith("out/emflow-run/done/features/") for k in run_keys), run_keys
    assert any(k.startswith("out/emflow-run/features/") for k in run_keys), run_keys
    assert "out/emflow-run/alignment.json" in run_keys
    assert "out/emflow-run/COMPLETE" not in run_keys

    # 2. the same recipe from another driver folder with an empty run cache: resumes
    second = _driver(tmp_path / "driver2", cache2, pods, recipe, env)
    out, err = clirun.outputs(second)
    assert second.returncode == 0, err[-3000:]
    (run_dir,) = list(cache2.glob("*/emflow-run"))
    records = list(lat.read_journal(run_dir))  # the first driver's sessions came from the bucket
    sessions = [r for r in records if r["event"] == "session"]
    assert len(sessions) == 2 and sessions[-1].get("resumed") is True, sessions
    last = sessions[-1]["session"]
    now = [r for r in records if r.get("session") == last]
    skipped = {r["stage"] for r in now if r["event"] == "skipped"}
    started = {r["stage"] for r in now if r["event"] == "start"}
    assert {"features", "match", "solve"} <= skipped and "features" not in started, now
    assert "slab" in started  # the pyramid ran on the pods after the resume

    # 3. byte-identical to a serial local run
    for name, want in reference.items():
        got = {k: v for k, v in s3.digest(bucket, f"out/{name}").items()
               if k != ".emflow-output.json"}  # fmt: skip
        assert want and got == want, name

    # 4. only the object store was shared: no run data in any pod or driver folder but the
    # second driver's run cache (the first driver's cache holds what it had before the kill)
    for folder in [*pods.folders, tmp_path / "driver1", tmp_path / "driver2"]:
        assert _run_data(folder) == [], folder
    assert _run_data(pods.workdir) == []
    for cache in (cache1, cache2):  # workers wrote their intermediates to the bucket only
        (copy,) = cache.glob("*/emflow-run")
        assert not [p.name for p in copy.iterdir() if p.name in runmirror.DATA], copy
    in_bucket = {k.removeprefix("out/emflow-run/") for k in s3.keys(bucket, "out/emflow-run/")}
    assert "COMPLETE" in in_bucket and not {k.split("/")[0] for k in in_bucket} & {
        "handoff", "features", "slice-cache", "rendered", "secrets", "scheduler.json",
    }  # fmt: skip
    assert s3.get(bucket, "out/emflow-run/COMPLETE") == (run_dir / "COMPLETE").read_bytes()
    for text in (out, err):
        assert S3_SECRET not in text and S3_KEY_ID not in text


# ---------------------------------------------------------------------------
# the recipe's storage section
# ---------------------------------------------------------------------------


def test_storage_section_refuses_credentials_naming_the_field(tmp_path: Path) -> None:
    """A key-looking field is refused (`emflow validate`: exit 2), naming the field and where
    credentials go; the value is never printed."""
    from emflow.errors import RecipeError
    from emflow.recipe import recipe_from_dict

    planted = "emflowPLANTEDrecipeSECRET0123"
    recipe = _recipe("s3://em/raw/*.png", "s3://em/out", secret_access_key=planted)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = clirun.emflow("validate", "recipe.yaml", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "field 'storage': 'secret_access_key' would put a credential" in done.stderr
    assert "environment" in done.stderr and "storage.profile" in done.stderr
    assert "Traceback" not in done.stderr and planted not in done.stdout + done.stderr
    for section, field in (
        ({"buckets": {"em": {"aws_access_key_id": planted}}}, "field 'storage.buckets.em': "),
        ({"session_token": planted}, "field 'storage': 'session_token'"),
        ({"endpoint": f"http://user:{planted}@127.0.0.1:9000"}, "field 'storage.endpoint'"),
    ):
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(_recipe("s3://em/raw/*.png", "s3://em/out", **section))
        assert field in str(err.value) and planted not in str(err.value)


def test_settings_plugin_carries_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """What workers receive is the recipe's section as written; each resolves it against its
    own environment (keys there: 'environment' credentials; anonymous buckets: unsigned)."""
    import pickle

    from emflow.cluster.storage import StorageSettingsPlugin, apply
    from emflow.io import storage
    from emflow.recipe import Storage

    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    section = Storage(endpoint="http://127.0.0.1:9", buckets={"pub": {"anonymous": True}})
    plugin = StorageSettingsPlugin(section.model_dump(mode="json"))
    blob = pickle.dumps(plugin)
    assert S3_SECRET.encode() not in blob and S3_KEY_ID.encode() not in blob
    try:
        apply(plugin.section)
        private, public = storage.s3_kvstore("em", "x/"), storage.s3_kvstore("pub", "x/")
    finally:
        storage._CURRENT = None
    assert private["endpoint"] == public["endpoint"] == "http://127.0.0.1:9"
    assert private["context"]["aws_credentials"] == {"type": "environment"}
    assert public["context"]["aws_credentials"] == {"type": "anonymous"}
    assert S3_SECRET not in repr(private) + repr(public)


@pytest.mark.integration
def test_anonymous_bucket_source_runs_unsigned(
    s3: S3Server, stack: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage.buckets.<b>.anonymous reads a public-read bucket with unsigned requests (the
    outputs equal the local run's); the same setting on a private bucket is refused (HTTP 403)
    although the environment holds keys moto would accept: the requests really carry none."""
    import json

    from emflow import api
    from emflow.errors import EmflowError
    from emflow.io import storage

    folder, reference = stack
    public, private = s3.bucket("pub"), s3.bucket("priv")
    for b in (public, private):
        s3.upload_dir(folder, b, "raw")
    s3.client().put_bucket_policy(Bucket=public, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*",
                       "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{public}", f"arn:aws:s3:::{public}/*"]}],
    }))  # fmt: skip
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    try:
        for b in (public, private):
            recipe = _recipe(
                f"s3://{b}/raw/*.png", str(tmp_path / b), endpoint=s3.endpoint, retries=2,
                buckets={b: {"anonymous": True}},
            )  # fmt: skip
            if b == private:
                with pytest.raises(EmflowError, match="access denied") as err:
                    api.run(recipe, progress=False)
                assert private in str(err.value) and S3_SECRET not in str(err.value)
                continue
            api.run(recipe, progress=False)
            for name, want in reference.items():
                assert tree_digest(tmp_path / b / name) == want, name
    finally:
        storage._CURRENT = None


def test_readme_storage_section_is_valid() -> None:
    """The README's storage: block is a valid recipe section, as written."""
    import re

    from emflow.recipe import Storage

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(storage:\n.*?)```", readme, re.S).group(1)
    section = Storage.model_validate(yaml.safe_load(block)["storage"])
    assert section.endpoint == "http://minio.lab:9000" and section.buckets["open-em-data"].anonymous
