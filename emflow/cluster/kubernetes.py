"""Kubernetes clusters through the dask-kubernetes operator.

The core representation is the ``DaskCluster`` resource of
:func:`kubernetes_spec` (``make_cluster_spec`` customised with volumes, env,
the scheduler preload :mod:`emflow.dask_preload` and a TLS secret), plus the
optional ``DaskAutoscaler`` of :func:`kubernetes_autoscaler` and the ``Secret``
of :func:`kubernetes_tls_secret`. :func:`_kubernetes_client` creates them, connects
over TLS and deletes them on exit.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from emflow.cluster.config import (
    _K8S_EMFLOW_KEYS,
    ClusterRequest,
    _adapt_bounds,
    _check_kind,
    load_config,
)
from emflow.cluster.local import _connect, client_on
from emflow.errors import ClusterError

logger = logging.getLogger(__name__)

PRELOAD_MODULE = "emflow.dask_preload"
#: where the kubernetes TLS secret is mounted in the scheduler and worker pods
K8S_TLS_DIR = "/etc/emflow/tls"


def kubernetes_spec(request: ClusterRequest) -> dict[str, Any]:
    """The ``DaskCluster`` resource emflow would create on Kubernetes.

    Built by dask-kubernetes' ``make_cluster_spec`` from the config's keyword
    arguments, then customised:

    * the scheduler container gets ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD`` =
      ``emflow.dask_preload`` so the lattice plugin and the ``/emflow``
      dashboard page exist in a scheduler emflow did not start (the image must
      contain emflow);
    * ``pod.volumes`` / ``pod.volumeMounts`` (e.g. a PVC holding the data),
      ``pod.nodeSelector`` and ``pod.tolerations`` go into both pod specs, ``pod.envFrom``
      (e.g. a Secret with object-store credentials) into both containers;
    * ``image`` must contain emflow (the repository's Dockerfile builds it): an image known
      to lack it, or credentials written into ``env``, are refused;
    * unless ``insecure``, the secret ``tls_secret`` (default ``<name>-tls``,
      keys ``ca.pem``, ``tls.crt``, ``tls.key``) is mounted at
      :data:`K8S_TLS_DIR`, the scheduler listens with ``--protocol tls`` and
      workers dial ``tls://<name>-scheduler.<namespace>:8786``.

    ``--workers`` sets the worker replicas, ``--threads-per-worker`` and
    ``--memory-per-worker`` the worker's ``--nthreads`` / ``--memory-limit``.
    """
    _check_kind(request)
    if request.kind != "kubernetes":
        raise ClusterError(f"kubernetes_spec needs --cluster kubernetes, not {request.kind!r}")
    config, _ = load_config(request)
    _check_image_and_env(config)
    from dask_kubernetes.operator import make_cluster_spec

    kw = {k: v for k, v in config.items() if k not in _K8S_EMFLOW_KEYS and v is not None}
    bounds = _adapt_bounds(request, config)
    if request.workers is not None:
        kw["n_workers"] = request.workers
    elif bounds is not None:
        kw["n_workers"] = bounds[0]
    worker_command = str(kw.pop("worker_command", "dask worker"))
    user_env = dict(kw.pop("env", None) or {})
    spec = make_cluster_spec(worker_command=worker_command, env=None, **kw)
    name = str(kw.get("name", "emflow"))
    namespace = config.get("namespace") or "default"

    from emflow.cluster import quiet

    # Dask's rarer tick and profile samples (emflow.cluster.quiet); the site's values win
    dask_env = quiet.env_vars(quiet.settings())
    scheduler_env = {
        **dask_env, **user_env, "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": PRELOAD_MODULE
    }  # fmt: skip
    from emflow.memory import WORKER_ENV, WORKER_MALLOC

    # malloc arenas and thresholds (emflow.memory; the pod's environment wins over the nanny's
    # MALLOC_TRIM_THRESHOLD_ default); the site's values win over emflow's
    worker_env = {**WORKER_ENV, **WORKER_MALLOC, **dask_env, **user_env}
    volumes = list((config.get("pod") or {}).get("volumes") or [])
    mounts = list((config.get("pod") or {}).get("volumeMounts") or [])
    if not request.insecure:
        secret = config.get("tls_secret") or f"{name}-tls"
        volumes.append({"name": "emflow-tls", "secret": {"secretName": secret}})
        mounts.append({"name": "emflow-tls", "mountPath": K8S_TLS_DIR, "readOnly": True})
        tls_env = {
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{K8S_TLS_DIR}/ca.pem",
        }
        for role, env in (("SCHEDULER", scheduler_env), ("WORKER", worker_env)):
            env.update(tls_env)
            env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = f"{K8S_TLS_DIR}/tls.crt"
            env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = f"{K8S_TLS_DIR}/tls.key"

    sched_container = spec["spec"]["scheduler"]["spec"]["containers"][0]
    worker_container = spec["spec"]["worker"]["spec"]["containers"][0]
    # distributed >= 2026.6 has no dask-scheduler/dask-worker scripts (dask/distributed#9335)
    if sched_container["args"][:1] == ["dask-scheduler"]:
        sched_container["args"] = ["dask", "scheduler", *sched_container["args"][1:]]
    sched_container["env"] = [{"name": k, "value": str(v)} for k, v in scheduler_env.items()]
    worker_container["env"] = [{"name": k, "value": str(v)} for k, v in worker_env.items()]
    if not request.insecure:
        sched_container["args"] = [*sched_container["args"], "--protocol", "tls"]
        # the operator sets DASK_SCHEDULER_ADDRESS to tcp://...; name the TLS address instead
        address = f"tls://{name}-scheduler.{namespace}:8786"
        n_cmd = len(worker_command.split())
        worker_container["args"] = [
            *worker_container["args"][:n_cmd],
            address,
            *worker_container["args"][n_cmd:],
        ]
    if request.threads_per_worker is not None:
        worker_container["args"] += ["--nthreads", str(request.threads_per_worker)]
    if request.memory_per_worker is not None:
        worker_container["args"] += ["--memory-limit", request.memory_per_worker]
    pod = config.get("pod") or {}
    for part, container in (("scheduler", sched_container), ("worker", worker_container)):
        pod_spec = spec["spec"][part]["spec"]
        if volumes:
            pod_spec["volumes"] = copy.deepcopy(volumes)
        if mounts:
            container["volumeMounts"] = copy.deepcopy(mounts)
        if pod.get("nodeSelector"):
            pod_spec["nodeSelector"] = dict(pod["nodeSelector"])
        if pod.get("tolerations"):
            pod_spec["tolerations"] = list(pod["tolerations"])
        if pod.get("envFrom"):
            container["envFrom"] = copy.deepcopy(list(pod["envFrom"]))
        if not container.get("resources"):
            container.pop("resources", None)
    if namespace != "default" or config.get("namespace"):
        spec["metadata"]["namespace"] = namespace
    return spec


#: images that run Dask but have no emflow in them (the scheduler preload cannot import)
_IMAGES_WITHOUT_EMFLOW = ("ghcr.io/dask/dask", "daskdev/dask", "docker.io/daskdev/dask")
#: environment variables whose values are credentials: they belong in a Secret (pod.envFrom)
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
)


def _check_image_and_env(config: dict[str, Any]) -> None:
    image = str(config.get("image") or "")
    if not image or image.split(":", 1)[0].split("@", 1)[0] in _IMAGES_WITHOUT_EMFLOW:
        raise ClusterError(
            f"--cluster kubernetes: image {image or '(none)'!r} has no emflow in it, so the "
            "scheduler preload and the workers' units cannot import; build the repository's "
            "Dockerfile (docker build -t REGISTRY/emflow:TAG .), push it, and set image: in the "
            "cluster config"
        )
    for name in config.get("env") or {}:
        if str(name).upper() in _SECRET_ENV or "SECRET" in str(name).upper():
            raise ClusterError(
                f"--cluster kubernetes: env {name} would write a credential into the DaskCluster "
                "spec; put it in a Kubernetes Secret and reference it with pod.envFrom "
                "(e.g. [{secretRef: {name: emflow-s3}}])"
            )


def kubernetes_tls_secret(name: str, security: Any, namespace: str = "default") -> dict[str, Any]:
    """A ``Secret`` manifest holding the certificates of ``security`` for the pods."""
    import base64

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {
            "ca.pem": b64(security.tls_ca_file),
            "tls.crt": b64(security.tls_scheduler_cert),
            "tls.key": b64(security.tls_scheduler_key),
        },
    }


@contextmanager
def _kubernetes_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    """Create the DaskCluster (and TLS secret, autoscaler), connect, delete all on exit.

    dask-kubernetes' ``KubeCluster`` talks to the scheduler in plain TCP (it waits
    forever on a TLS scheduler), so with TLS emflow creates the resources with kr8s
    itself and connects over ``tls://``: directly to the service inside the
    cluster, else through a port-forward. ``--insecure`` uses ``KubeCluster``.
    """
    try:
        import kr8s
        from kr8s.objects import Secret, Service, new_class
    except ImportError as exc:
        raise ClusterError(
            "--cluster kubernetes needs dask-kubernetes; pip install 'emflow[kubernetes]'"
        ) from exc
    from distributed.security import Security

    spec = kubernetes_spec(request)
    name = spec["metadata"]["name"]
    namespace = config.get("namespace") or "default"
    try:
        api = kr8s.api(namespace=namespace)
        api.version()
    except Exception as exc:  # kr8s raises several types for missing credentials
        raise ClusterError(
            f"--cluster kubernetes: no Kubernetes API ({str(exc).splitlines()[0]}); "
            "check kubectl access (KUBECONFIG)"
        ) from exc
    if request.insecure:
        with _kubecluster_client(request, config, spec, namespace) as client:
            yield client
        return
    security = Security.temporary()
    created: list[Any] = []
    forward = None
    client = None
    try:
        secret_name = config.get("tls_secret") or f"{name}-tls"
        for manifest, cls in (
            (kubernetes_tls_secret(secret_name, security, namespace), Secret),
            (spec, new_class("DaskCluster", "kubernetes.dask.org/v1", namespaced=True)),
            (
                kubernetes_autoscaler(request),
                new_class("DaskAutoscaler", "kubernetes.dask.org/v1", namespaced=True),
            ),
        ):
            if manifest is None:
                continue
            manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
            obj = cls(manifest, api=api)
            try:
                obj.create()
            except Exception as exc:
                raise ClusterError(
                    f"--cluster kubernetes: cannot create {manifest['kind']} "
                    f"{manifest['metadata']['name']} ({str(exc).splitlines()[0]}); check that "
                    "the dask-kubernetes operator is installed and you may create it"
                ) from exc
            created.append(obj)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):  # running inside the cluster
            address = f"tls://{name}-scheduler.{namespace}:8786"
        else:
            service = _wait_for_service(Service, f"{name}-scheduler", api, timeout_s=300)
            forward = service.portforward(remote_port=8786, local_port="auto")
            port = forward.start()
            address = f"tls://127.0.0.1:{port}"
        client = _connect(
            address,
            security,
            "300s",
            f"--cluster kubernetes: scheduler {name}-scheduler did not answer in 300 s "
            f"({{exc}}); see `kubectl logs -l dask.org/cluster-name={name}`",
        )
        yield client
    finally:
        if client is not None:
            client.close()
        if forward is not None:
            forward.stop()
        for obj in reversed(created):
            try:
                obj.delete()
            except Exception as exc:  # pragma: no cover - best effort
                logger.warning("could not delete %s: %s", obj, exc)


def _wait_for_service(service_cls: Any, name: str, api: Any, timeout_s: float) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            service = service_cls.get(name, api=api)
            if service.ready():
                return service
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise ClusterError(f"--cluster kubernetes: service {name} not ready in {timeout_s} s")
        time.sleep(1)


def kubernetes_autoscaler(request: ClusterRequest) -> dict[str, Any] | None:
    """The ``DaskAutoscaler`` resource for ``adapt`` bounds, or ``None`` (fixed replicas)."""
    config, _ = load_config(request)
    bounds = _adapt_bounds(request, config)
    if bounds is None or (
        request.max_workers is None and (config.get("adapt") or {}).get("maximum") is None
    ):
        return None
    name = str(config.get("name") or "emflow")
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskAutoscaler",
        "metadata": {"name": name},
        "spec": {"cluster": name, "minimum": bounds[0], "maximum": bounds[1]},
    }


@contextmanager
def _kubecluster_client(
    request: ClusterRequest, config: dict[str, Any], spec: dict[str, Any], namespace: str
) -> Iterator[Any]:
    from dask_kubernetes.operator import KubeCluster

    try:
        cluster = KubeCluster(custom_cluster_spec=spec, namespace=namespace)
    except Exception as exc:  # kr8s raises several types for missing credentials
        raise ClusterError(
            f"--cluster kubernetes: cannot create the DaskCluster ({str(exc).splitlines()[0]}); "
            "check kubectl access and that the dask-kubernetes operator is installed"
        ) from exc
    adapt = None
    if kubernetes_autoscaler(request) is not None:
        low, high = _adapt_bounds(request, config) or (0, 0)
        adapt = lambda: cluster.adapt(minimum=low, maximum=high)  # noqa: E731
    with client_on(cluster, setup=adapt) as client:
        yield client
