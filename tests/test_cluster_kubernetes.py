"""The Kubernetes path without a Kubernetes cluster.

1. ``kubernetes_spec`` carries the config: image, resources, env, volumes, PVC,
   nodeSelector, the scheduler preload and the TLS secret mount;
2. it validates against the DaskCluster CRD shipped inside dask-kubernetes and its
   pod specs against the Kubernetes API schema (kubernetes-validate, strict);
3. "pod emulation": the scheduler and worker commands of the spec, started as local
   processes with the spec's environment and the TLS secret "mounted" in a
   directory, form a cluster that completes a small run and refuses clients
   without the certificates.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import gc
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
dask_kubernetes = pytest.importorskip("dask_kubernetes")

from emflow.cluster import (  # noqa: E402
    K8S_TLS_DIR,
    PRELOAD_MODULE,
    ClusterRequest,
    describe,
    kubernetes_autoscaler,
    kubernetes_spec,
    kubernetes_tls_secret,
    open_client,
)
from emflow.errors import ClusterError  # noqa: E402
from emflow.memory import WORKER_ENV, WORKER_MALLOC  # noqa: E402

K8S_VERSION = "1.30"
CRD = (
    Path(dask_kubernetes.__file__).parent
    / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
)

SITE = """\
name: em-ingest
image: registry.example.org/emflow:0.1.0
n_workers: 3
namespace: em
resources:
  requests: {cpu: "2", memory: 8Gi}
  limits: {cpu: "2", memory: 8Gi}
env: {OMP_NUM_THREADS: "1"}
pod:
  volumes: [{name: data, persistentVolumeClaim: {claimName: em-data}}]
  volumeMounts: [{name: data, mountPath: /data}]
  nodeSelector: {pool: highmem}
  tolerations: [{key: dedicated, operator: Equal, value: em, effect: NoSchedule}]
"""


def _request(tmp_path: Path, text: str = SITE, **kw: Any) -> ClusterRequest:
    site = tmp_path / "k8s.yaml"
    site.write_text(text)
    return ClusterRequest("kubernetes", config_path=site, **kw)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env") or []}


def _containers(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        spec["spec"]["scheduler"]["spec"]["containers"][0],
        spec["spec"]["worker"]["spec"]["containers"][0],
    )


# ---------------------------------------------------------------------------
# 1. what the spec carries
# ---------------------------------------------------------------------------


def test_spec_carries_the_site_config(tmp_path: Path) -> None:
    spec = kubernetes_spec(_request(tmp_path, workers=5, threads_per_worker=2,
                                    memory_per_worker="6GiB"))  # fmt: skip
    assert spec["kind"] == "DaskCluster"
    assert spec["metadata"] == {"name": "em-ingest", "namespace": "em"}
    assert spec["spec"]["worker"]["replicas"] == 5  # --workers wins over n_workers
    sched, worker = _containers(spec)
    for c in (sched, worker):
        assert c["image"] == "registry.example.org/emflow:0.1.0"
        assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                                  "limits": {"cpu": "2", "memory": "8Gi"}}  # fmt: skip
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
        assert {"name": "emflow-tls", "mountPath": K8S_TLS_DIR, "readOnly": True} in c[
            "volumeMounts"
        ]
        assert _env(c)["OMP_NUM_THREADS"] == "1"
        assert _env(c)["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    for part in ("scheduler", "worker"):
        pod = spec["spec"][part]["spec"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "em-data"}} in pod["volumes"]
        assert {"name": "emflow-tls", "secret": {"secretName": "em-ingest-tls"}} in pod["volumes"]
        assert pod["nodeSelector"] == {"pool": "highmem"}
        assert pod["tolerations"][0]["key"] == "dedicated"
    # the lattice plugin must exist in a scheduler emflow did not start
    assert _env(sched)["DASK_DISTRIBUTED__SCHEDULER__PRELOAD"] == PRELOAD_MODULE
    assert "DASK_DISTRIBUTED__SCHEDULER__PRELOAD" not in _env(worker)
    # emflow's malloc arenas and thresholds reach the worker (the pod's env wins in the nanny)
    assert {k: _env(worker)[k] for k in (*WORKER_ENV, *WORKER_MALLOC)} == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    }
    # Dask's rarer tick (scheduler and workers) and profile samples (emflow.cluster.quiet)
    assert _env(sched)["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "1s"
    assert _env(worker)["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "1s"
    assert _env(worker)["DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL"] == "100ms"
    # current distributed has only `dask scheduler` / `dask worker` (dask/distributed#9335)
    assert sched["args"] == ["dask", "scheduler", "--host", "0.0.0.0", "--protocol", "tls"]
    assert worker["args"][:3] == ["dask", "worker", "tls://em-ingest-scheduler.em:8786"]
    assert worker["args"][-4:] == ["--nthreads", "2", "--memory-limit", "6GiB"]
    assert _env(sched)["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT"] == f"{K8S_TLS_DIR}/tls.crt"
    assert _env(worker)["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == f"{K8S_TLS_DIR}/tls.key"


def test_insecure_spec_has_no_tls(tmp_path: Path) -> None:
    spec = kubernetes_spec(_request(tmp_path, insecure=True))
    sched, worker = _containers(spec)
    assert "--protocol" not in sched["args"]
    assert not any("tls" in a for a in worker["args"])
    assert not any("TLS" in k for k in _env(sched) | _env(worker))
    assert all(v["name"] != "emflow-tls" for v in spec["spec"]["worker"]["spec"]["volumes"])


def test_describe_kubernetes_returns_the_spec(tmp_path: Path) -> None:
    out = describe(_request(tmp_path))
    assert out["cluster_class"].startswith("dask_kubernetes.operator")
    assert out["kwargs"]["custom_cluster_spec"] == kubernetes_spec(_request(tmp_path))
    assert out["kwargs"]["namespace"] == "em"
    assert out["kwargs"]["autoscaler"] is None  # fixed replicas without a maximum
    assert out["adapt"] is None


def test_max_workers_adds_an_autoscaler(tmp_path: Path) -> None:
    request = _request(tmp_path, workers=2, max_workers=8)
    assert kubernetes_autoscaler(request) == {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskAutoscaler",
        "metadata": {"name": "em-ingest"},
        "spec": {"cluster": "em-ingest", "minimum": 2, "maximum": 8},
    }
    assert describe(request)["adapt"] == {"minimum": 2, "maximum": 8}
    _crd_validator("daskautoscaler").validate(kubernetes_autoscaler(request))


def test_no_kubernetes_api_is_a_cluster_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credentials open_client fails at once, creates nothing, leaves no reaper noise."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for insecure in (False, True):
        with pytest.warns() if insecure else contextlib.nullcontext():
            with pytest.raises(ClusterError, match="no Kubernetes API"):
                with open_client(_request(tmp_path, insecure=insecure)):
                    pass


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("pod: {volume: []}\n", "unknown key pod.volume"),
        ("resources: {limit: {cpu: '1'}}\n", "unknown key resources.limit"),
        ("imagePullPolicy: Always\n", "unknown key 'imagePullPolicy'"),
    ],
)
def test_bad_kubernetes_keys_are_cluster_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ClusterError, match=fragment):
        kubernetes_spec(_request(tmp_path, text))


# ---------------------------------------------------------------------------
# 2. schemas
# ---------------------------------------------------------------------------


@functools.cache
def _crd_validator(kind: str = "daskcluster") -> Any:
    """Validator of a v1 CRD schema shipped in dask-kubernetes (each loaded once)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.with_name(f"{kind}.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _pod(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec}


@pytest.mark.parametrize("insecure", [False, True])
def test_spec_validates_against_daskcluster_crd(tmp_path: Path, insecure: bool) -> None:
    spec = kubernetes_spec(_request(tmp_path, insecure=insecure))
    _crd_validator().validate(spec)
    # the schema is not vacuous: a missing part or a mistyped value fails
    broken = copy.deepcopy(spec)
    del broken["spec"]["scheduler"]
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator().validate(broken)
    broken = copy.deepcopy(spec)
    broken["spec"]["worker"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator().validate(broken)


@pytest.mark.parametrize("insecure", [False, True])
def test_pod_specs_validate_against_kubernetes_api(tmp_path: Path, insecure: bool) -> None:
    spec = kubernetes_spec(_request(tmp_path, insecure=insecure))
    for part in ("scheduler", "worker"):
        kubernetes_validate.validate(
            _pod(spec["spec"][part]["spec"], f"em-{part}"), K8S_VERSION, strict=True
        )
    # strict mode catches a misspelt container field
    bad = copy.deepcopy(spec["spec"]["worker"]["spec"])
    bad["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_pod(bad, "bad"), K8S_VERSION, strict=True)


def test_default_spec_validates(tmp_path: Path) -> None:
    spec = kubernetes_spec(ClusterRequest("kubernetes"))
    _crd_validator().validate(spec)
    kubernetes_validate.validate(_pod(spec["spec"]["worker"]["spec"], "w"), K8S_VERSION,
                                 strict=True)  # fmt: skip


def test_tls_secret_manifest_validates() -> None:
    from distributed.security import Security

    secret = kubernetes_tls_secret("em-ingest-tls", Security.temporary(), "em")
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    assert set(secret["data"]) == {"ca.pem", "tls.crt", "tls.key"}


# ---------------------------------------------------------------------------
# 3. pod emulation
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(args: list[str], env: dict[str, str]) -> list[str]:
    """Container args -> local argv: `dask` from this interpreter, $(VAR) expanded."""
    out = []
    for a in args:
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        out.append(a)
    if out[:1] == ["dask"]:
        out = [sys.executable, "-m", "dask", *out[1:]]
    return out


def _wait_for(path: Path, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}")
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"{proc.args} did not start within {seconds} s")


class _Pods:
    """The scheduler and worker pods of a spec, run as local processes."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        from distributed.security import Security

        self.workdir = workdir
        self.security = Security.temporary()
        # the secret volume: the Secret manifest emflow creates, decoded into files
        secret = kubernetes_tls_secret("em-tls", self.security)
        self.tls_dir = workdir / "tls"
        self.tls_dir.mkdir(parents=True)
        for key, value in secret["data"].items():
            (self.tls_dir / key).write_bytes(base64.b64decode(value))
            (self.tls_dir / key).chmod(0o600)
        self.port = _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        sched, worker = _containers(spec)
        self.scheduler_env = self._env(sched)
        # what differs from a pod: ports (no pod network) and the service DNS name
        sched_args = [
            *_command(sched["args"], self.scheduler_env),
            "--port", str(self.port), "--dashboard-address", f"127.0.0.1:{_free_port()}",
            "--scheduler-file", str(workdir / "scheduler.json"),
        ]  # fmt: skip
        self._start(sched_args, self.scheduler_env, "scheduler")
        _wait_for(workdir / "scheduler.json", self.procs[0])
        self.address = f"tls://127.0.0.1:{self.port}"
        for i in range(spec["spec"]["worker"]["replicas"]):
            env = self._env(worker)
            env["DASK_WORKER_NAME"] = f"em-default-worker-{i}"
            # the operator sets a tcp:// address; the spec's explicit tls:// one must win
            env["DASK_SCHEDULER_ADDRESS"] = f"tcp://127.0.0.1:{self.port}"
            args = [
                self.address if a.startswith("tls://") else a for a in _command(worker["args"], env)
            ]
            args = [("127.0.0.1:0" if a == "8788" else a) for a in args]
            self._start(args, env, f"worker-{i}")

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        # a pod has only what its spec says (no DASK_ config; no malloc settings a local
        # nanny of this test process left in os.environ)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "MALLOC_"))}
        for k, v in _env(container).items():
            env[k] = v.replace(K8S_TLS_DIR, str(self.tls_dir))
        return env

    def _start(self, argv: list[str], env: dict[str, str], name: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                           cwd=self.workdir))  # fmt: skip

    def client_security(self) -> Any:
        from distributed.security import Security

        return Security(
            tls_ca_file=str(self.tls_dir / "ca.pem"),
            tls_client_cert=str(self.tls_dir / "tls.crt"),
            tls_client_key=str(self.tls_dir / "tls.key"),
            require_encryption=True,
        )

    def close(self) -> None:
        """Stop the pods: SIGTERM (workers first), SIGKILL what is left after 5 s."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pods]:
    tmp = tmp_path_factory.mktemp("k8s")
    site = tmp / "k8s.yaml"
    site.write_text("name: em\nn_workers: 2\nenv: {OMP_NUM_THREADS: '1'}\n")
    spec = kubernetes_spec(ClusterRequest("kubernetes", config_path=site, threads_per_worker=1,
                                          memory_per_worker="1GiB"))  # fmt: skip
    p = _Pods(spec, tmp / "pods")
    try:
        yield p
    finally:
        p.close()


def _digest(out: Path) -> dict[str, str]:
    return {
        str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(out.rglob("*"))
        if f.is_file()
        and "emflow-run" not in f.relative_to(out).parts
        and f.name != ".emflow-output.json"  # ownership marker: names its own output_dir
    }


@pytest.mark.integration
def test_emulated_pods_complete_a_run(pods: _Pods, tmp_path: Path) -> None:
    from distributed import Client

    api = pytest.importorskip("emflow.api", reason="emflow.api not importable yet")
    from emflow.testing import synthetic_slices, write_stack

    src = tmp_path / "slices"
    write_stack(synthetic_slices((16, 128, 128), seed=5), src, pattern="s_%03d.png")

    def recipe(out: Path) -> dict[str, Any]:
        return {
            "source": {"glob": str(src / "*.png")},
            "voxel_size_nm": [8, 8, 40],
            "align": False,
            "output_dir": str(out),
            "outputs": [{"format": "omezarr", "name": "em.ome.zarr",
                         "chunk_size_xyz": [64, 64, 8]}],
        }  # fmt: skip

    with Client(pods.address, security=pods.client_security(), timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        workers = client.scheduler_info()["workers"]
        assert all(a.startswith("tls://") for a in workers)
        assert sorted(w["name"] for w in workers.values()) == [
            "em-default-worker-0", "em-default-worker-1",
        ]  # fmt: skip
        assert client.submit(sum, range(10)).result() == 45
        # the worker processes run with emflow's malloc settings, not the nanny's 64 KiB trim
        want = {**WORKER_ENV, **WORKER_MALLOC}
        envs = client.run(lambda keys=tuple(want): {k: os.environ.get(k) for k in keys})
        assert list(envs.values()) == [want, want], envs
        api.run(recipe(tmp_path / "pods-out"), client=client, progress=False)
    api.run(recipe(tmp_path / "serial-out"))
    assert _digest(tmp_path / "pods-out") == _digest(tmp_path / "serial-out")


@pytest.mark.integration
def test_emulated_scheduler_refuses_clients_without_certificates(pods: _Pods) -> None:
    from distributed import Client
    from distributed.security import Security

    for security in (None, Security.temporary()):
        accepted = False
        try:
            Client(pods.address, security=security, timeout=3).close()
            accepted = True
        except (OSError, TimeoutError, TypeError, ValueError):
            pass
        gc.collect()  # see emflow.cluster._connect: a failed Client must not linger
        assert not accepted, f"client with security={security!r} was accepted"


@pytest.mark.integration
def test_emulated_scheduler_loaded_the_emflow_preload(pods: _Pods) -> None:
    from distributed import Client

    def preloads(dask_scheduler: Any) -> list[str]:
        return [str(getattr(p, "name", p)) for p in dask_scheduler.preloads]

    def plugins(dask_scheduler: Any) -> list[str]:
        return list(dask_scheduler.plugins)

    from emflow.lattice import PLUGIN_NAME

    with Client(pods.address, security=pods.client_security(), timeout=30) as client:
        assert PRELOAD_MODULE in client.run_on_scheduler(preloads)
        assert PLUGIN_NAME in client.run_on_scheduler(plugins)


def _emflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`emflow ...` from the shell, as a user beside the driver runs it."""
    return subprocess.run([sys.executable, "-m", "emflow", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _counts(snap: dict[str, Any]) -> dict[str, dict[str, int]]:
    (run,) = snap["runs"]
    return {st["stage"]: {"total": st["total"], **st["counts"]} for st in run["stages"]}


@pytest.mark.integration
def test_control_commands_reach_a_run_on_the_emulated_pods(
    pods: _Pods, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run on the Kubernetes pods, driven as `--cluster kubernetes` drives it (a client with
    the TLS Secret's in-memory certificates), is reached from the shell: `emflow status`
    (live counts), `pause` (the run pauses), `resume` (it completes, equal to a serial run)
    with the client credentials the run folder holds; after the end `status` reads the journal.
    """
    import json
    import stat
    import threading

    from distributed import Client

    from emflow import api
    from emflow import lattice as lat
    from emflow.testing import synthetic_slices, write_stack

    src = tmp_path / "slices"
    write_stack(synthetic_slices((16, 128, 128), seed=7), src, pattern="s_%03d.png")

    def recipe(out: Path) -> dict[str, Any]:
        return {
            "source": {"glob": str(src / "*.png")},
            "voxel_size_nm": [8, 8, 40],
            "align": False,
            "output_dir": str(out),
            "outputs": [{"format": "omezarr", "name": "em.ome.zarr",
                         "chunk_size_xyz": [64, 64, 4]}],
            "run": {"slab_depth": 4},
        }  # fmt: skip

    out = tmp_path / "pods-out"
    run_dir = out / "emflow-run"
    run_id = api.as_recipe(recipe(out)).output_fingerprint()
    outcome: dict[str, Any] = {}

    def drive(client: Any) -> None:
        try:
            outcome["result"] = api.run(recipe(out), client=client, progress=False)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    # what `emflow run --cluster kubernetes` does: connect with the Secret's in-memory certificates
    client = Client(pods.address, security=pods.security, timeout=30)
    driver = threading.Thread(target=drive, args=(client,), name="k8s-driver", daemon=True)
    monkeypatch.setenv("EMFLOW_PAUSE_AFTER", "slab:1")  # hold the run once 1 slab unit started
    try:
        client.wait_for_workers(2, timeout=60)
        driver.start()
        deadline = time.monotonic() + 120
        while not any(r["event"] == "pause" and r.get("stage") == "slab"
                      for r in lat.read_journal(run_dir)):  # fmt: skip
            assert driver.is_alive(), f"the run ended before it held at slab: {outcome}"
            assert time.monotonic() < deadline, "the run did not hold at slab within 120 s"
            time.sleep(0.05)
        # the run folder holds what a client needs: the address and owner-only certificates
        info = lat.read_scheduler_file(run_dir)
        assert info["address"] == pods.address and info["run_id"] == run_id
        assert stat.S_IMODE((run_dir / "secrets").stat().st_mode) == 0o700
        pems = {k: run_dir / v for k, v in info["tls"].items()}
        assert sorted(pems) == ["ca_file", "cert", "key"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems.values())

        live = _emflow("status", str(out), "--json", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
        snap = json.loads(live.stdout)
        assert snap["live"] is True, live.stderr
        assert snap["source"].startswith(f"live, scheduler {pods.address}")
        assert snap["runs"][0]["paused_stages"] == ["slab"] and not snap["runs"][0]["paused"]
        held = _counts(snap)
        slab = held["slab"]
        assert slab["total"] == 4 and slab["done"] + slab["running"] == 1  # 1 unit let through
        assert slab["waiting"] == 3 and slab["queued"] == slab["failed"] == 0
        assert held["coarse1"]["total"] == held["finalize"]["total"] == 1
        assert held["coarse1"]["waiting"] == held["finalize"]["waiting"] == 1

        paused = _emflow("pause", str(out), cwd=tmp_path)
        assert paused.returncode == 0 and "paused run" in paused.stdout, paused.stderr
        now = _emflow("status", str(out), "--json", cwd=tmp_path)
        assert now.returncode == 0 and json.loads(now.stdout)["runs"][0]["paused"] is True
        resumed = _emflow("resume", str(out), cwd=tmp_path)
        assert resumed.returncode == 0 and "resumed run" in resumed.stdout, resumed.stderr
        driver.join(timeout=180)
        assert not driver.is_alive(), "the resumed run did not end within 180 s"
    finally:
        monkeypatch.delenv("EMFLOW_PAUSE_AFTER")
        if driver.is_alive():  # a failed assertion: cancel the run rather than leave it held
            with contextlib.suppress(Exception):
                client.sync(client.scheduler.emflow_cancel, run_id=run_id)
            driver.join(timeout=60)
        client.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].output_paths["em.ome.zarr"] == out / "em.ome.zarr"
    assert not list((run_dir / "secrets").glob("client-*.pem")), "the driver removed them"
    requests = [r["event"] for r in lat.read_journal(run_dir) if r["event"].endswith("_request")]
    assert requests == ["pause_request", "resume_request"]

    ended = _emflow("status", str(out), "--json", cwd=tmp_path)
    assert ended.returncode == 0, ended.stderr
    snap = json.loads(ended.stdout)
    assert snap["live"] is False and snap["source"] == "journal, run complete"
    final = _counts(snap)
    assert {s: (c["total"], c["done"], c["redone"], c["failed"]) for s, c in final.items()} == {
        "slab": (4, 4, 0, 0), "coarse1": (1, 1, 0, 0), "finalize": (1, 1, 0, 0),
    }  # fmt: skip

    api.run(recipe(tmp_path / "serial-out"), progress=False)
    assert _digest(out) == _digest(tmp_path / "serial-out")
