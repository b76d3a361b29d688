"""Turn ``--cluster NAME`` plus a site YAML into a Dask ``Client``.

One request (:class:`ClusterRequest`) describes where a run executes:

* ``local`` — a :class:`distributed.LocalCluster` on this machine (no TLS);
* ``slurm``, ``lsf``, ``pbs``, ``sge`` — a dask-jobqueue cluster whose workers
  are batch jobs; scaled with ``adapt`` (minimum/maximum jobs), each worker
  retires itself (``--lifetime``) before the job's walltime, job logs go to a
  log directory, and scheduler, workers and client talk TLS with temporary
  certificates written to a shared directory;
* ``kubernetes`` — a ``DaskCluster`` resource of the dask-kubernetes operator,
  built with ``make_cluster_spec`` and customised (volumes, env, resources,
  scheduler preload :mod:`emflow.dask_preload`, TLS secret);
* ``tcp://host:port`` / ``tls://host:port`` — an existing scheduler.

Configuration is a flat YAML mapping whose keys are the keyword arguments of
the cluster class (``LocalCluster``, ``SLURMCluster``, ... or
``make_cluster_spec``), passed through unchanged. emflow reserves a few keys of
its own, documented in the shipped ``cluster_configs/<kind>.yaml``:
``adapt: {minimum, maximum}`` (workers; one worker per job) for every kind,
and ``pod`` / ``namespace`` / ``tls_secret`` for kubernetes. The built-in
:data:`DEFAULTS` equal the shipped YAML files (a test keeps them in step) so
an installed emflow without the repository behaves the same.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import shlex
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emflow.errors import ClusterError

__all__ = [
    "CLUSTER_KINDS",
    "DEFAULTS",
    "PRELOAD_MODULE",
    "ClusterRequest",
    "describe",
    "job_script",
    "kubernetes_autoscaler",
    "kubernetes_spec",
    "kubernetes_tls_secret",
    "load_config",
    "open_client",
]

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "slurm", "lsf", "pbs", "sge", "kubernetes")
JOBQUEUE_KINDS = ("slurm", "lsf", "pbs", "sge")
PRELOAD_MODULE = "emflow.dask_preload"
#: where the kubernetes TLS secret is mounted in the scheduler and worker pods
K8S_TLS_DIR = "/etc/emflow/tls"

_JOBQUEUE_CLASS = {
    "slurm": "SLURMCluster",
    "lsf": "LSFCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
}
_ADDRESS_RE = re.compile(r"^(tcp|tls)://[^\s:/]+:\d+$")

_JOBQUEUE_COMMON: dict[str, Any] = {
    "cores": 1,
    "memory": "4GiB",
    "processes": 1,
    "interface": None,
    "death_timeout": 60,
    "local_directory": None,
    "job_name": "emflow-worker",
    "job_extra_directives": [],
    "job_script_prologue": [],
    "worker_extra_args": [],
    "log_directory": None,
    "shared_temp_directory": None,
    "scheduler_options": {},
    "adapt": {"minimum": 1, "maximum": 4},
}

#: Built-in defaults per kind; identical to ``cluster_configs/<kind>.yaml``.
DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {
        "n_workers": None,
        "threads_per_worker": None,
        "memory_limit": "auto",
        "processes": True,
        "adapt": {"minimum": None, "maximum": None},
    },
    "slurm": {**_JOBQUEUE_COMMON, "queue": None, "account": None, "walltime": "01:00:00"},
    "lsf": {
        **_JOBQUEUE_COMMON,
        "queue": None,
        "project": None,
        "walltime": "01:00",
        "lsf_units": "MB",
        "use_stdin": True,
    },
    "pbs": {
        **_JOBQUEUE_COMMON,
        "queue": None,
        "account": None,
        "resource_spec": None,
        "walltime": "01:00:00",
    },
    "sge": {
        **_JOBQUEUE_COMMON,
        "queue": None,
        "project": None,
        "resource_spec": None,
        "walltime": "01:00:00",
    },
    "kubernetes": {
        "name": "emflow",
        "image": "ghcr.io/dask/dask:latest",
        "n_workers": 2,
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi"},
            "limits": {"cpu": "1", "memory": "4Gi"},
        },
        "env": {},
        "worker_command": "dask worker",
        "scheduler_service_type": "ClusterIP",
        "idle_timeout": 0,
        "namespace": None,
        "tls_secret": None,
        "pod": {"volumes": [], "volumeMounts": [], "nodeSelector": {}, "tolerations": []},
        "adapt": {"minimum": None, "maximum": None},
    },
}

_EMFLOW_KEYS = {"adapt"}
_K8S_EMFLOW_KEYS = {"adapt", "namespace", "pod", "tls_secret"}
_K8S_POD_KEYS = {"volumes", "volumeMounts", "nodeSelector", "tolerations"}
_K8S_RESOURCE_KEYS = {"requests", "limits", "claims"}


@dataclass(frozen=True)
class ClusterRequest:
    """Where and how a run executes (what ``--cluster`` and its options say).

    Parameters
    ----------
    kind : str
        One of :data:`CLUSTER_KINDS` or a scheduler address ``tcp://host:port`` /
        ``tls://host:port``.
    config_path : Path, optional
        Site YAML merged over the defaults of ``kind``; ``None`` uses
        ``cluster_configs/<kind>.yaml`` of the repository when present, else
        the identical built-in :data:`DEFAULTS`.
    workers : int, optional
        ``--workers N``: local ``n_workers``; adapt minimum elsewhere.
    max_workers : int, optional
        ``--max-workers M``: adapt maximum.
    threads_per_worker : int, optional
        Threads per worker (jobqueue ``cores`` of a one-process job).
    memory_per_worker : str, optional
        Memory per worker, e.g. ``"4GiB"`` (jobqueue ``memory``).
    insecure : bool
        ``--insecure``: plain TCP on a non-local cluster (emits a warning).
    log_dir : Path, optional
        Directory for worker job logs (the run folder's ``worker-logs``); also
        the shared directory for temporary TLS files when the YAML sets none.
    dashboard_address : str
        Address of the scheduler's dashboard; ``":0"`` picks a free port.
    """

    kind: str = "local"
    config_path: Path | None = None
    workers: int | None = None
    max_workers: int | None = None
    threads_per_worker: int | None = None
    memory_per_worker: str | None = None
    insecure: bool = False
    log_dir: Path | None = None
    dashboard_address: str = ":8787"


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def _is_address(kind: str) -> bool:
    return "://" in kind


def _check_kind(request: ClusterRequest) -> None:
    if _is_address(request.kind):
        if not _ADDRESS_RE.match(request.kind):
            raise ClusterError(
                f"--cluster {request.kind!r} is not a scheduler address; "
                "use tcp://host:port or tls://host:port"
            )
        return
    if request.kind not in CLUSTER_KINDS:
        raise ClusterError(
            f"--cluster {request.kind!r} is unknown; use one of {', '.join(CLUSTER_KINDS)} "
            "or a scheduler address tcp://host:port"
        )
    for opt, value in (("--workers", request.workers), ("--max-workers", request.max_workers)):
        if value is not None and value < 0:
            raise ClusterError(f"{opt} {value} is negative; give a count of workers >= 0")
    if (
        request.workers is not None
        and request.max_workers is not None
        and request.max_workers < request.workers
    ):
        raise ClusterError(
            f"--max-workers {request.max_workers} is below --workers {request.workers}; "
            "raise --max-workers"
        )


def shipped_config_path(kind: str) -> Path | None:
    """Path of ``cluster_configs/<kind>.yaml`` in the source tree, if present."""
    path = Path(__file__).resolve().parent.parent / "cluster_configs" / f"{kind}.yaml"
    return path if path.is_file() else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClusterError(
            f"cluster config {path}: cannot read ({exc.strerror}); check --cluster-config"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ClusterError(f"cluster config {path}: invalid YAML ({first}); fix the file") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClusterError(
            f"cluster config {path}: expected a mapping of keyword arguments, "
            f"got {type(data).__name__}"
        )
    # accept dask-jobqueue's dashed spelling (death-timeout) for the kwarg (death_timeout)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(request: ClusterRequest) -> tuple[dict[str, Any], str]:
    """Resolve the cluster YAML of ``request`` (without command-line options).

    Returns
    -------
    config : dict
        Built-in defaults of the kind, overlaid with the shipped YAML (if no
        ``config_path``) or with the site YAML; mappings are merged one level
        deep (``adapt``, ``pod``).
    source : str
        Where the values came from, for ``emflow plan``.
    """
    _check_kind(request)
    kind = "address" if _is_address(request.kind) else request.kind
    config = copy.deepcopy(DEFAULTS.get(kind, {}))
    if request.config_path is not None:
        path = Path(request.config_path)
        if not path.is_file():
            raise ClusterError(f"--cluster-config {path}: no such file; give a YAML file path")
        overlay, source = _read_yaml(path), str(path)
    elif (shipped := shipped_config_path(kind)) is not None:
        overlay, source = _read_yaml(shipped), str(shipped)
    else:
        overlay, source = {}, "built-in defaults"
    for key, value in overlay.items():
        if (
            isinstance(value, dict)
            and isinstance(config.get(key), dict)
            and key
            in (
                "adapt",
                "pod",
            )
        ):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    _validate_keys(kind, config, source)
    return config, source


def _allowed_keys(kind: str) -> set[str] | None:
    """Keyword arguments the cluster class of ``kind`` accepts (None: unchecked)."""
    if kind in JOBQUEUE_KINDS:
        import dask_jobqueue
        from dask_jobqueue.core import Job, JobQueueCluster

        cluster_cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS[kind])
        names: set[str] = set()
        for fn in (JobQueueCluster.__init__, Job.__init__, cluster_cls.job_cls.__init__):
            names |= set(inspect.signature(fn).parameters)
        return (names - {"self", "scheduler", "job_cls", "kwargs"}) | _EMFLOW_KEYS
    if kind == "kubernetes":
        return {
            "name",
            "image",
            "n_workers",
            "resources",
            "env",
            "worker_command",
            "scheduler_service_type",
            "idle_timeout",
            "jupyter",
        } | _K8S_EMFLOW_KEYS
    if kind == "address":
        return {"security", "timeout"}
    return None  # LocalCluster forwards unknown keys to Worker/Nanny


def _validate_keys(kind: str, config: dict[str, Any], source: str) -> None:
    allowed = _allowed_keys(kind)
    if allowed is not None:
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ClusterError(
                f"cluster config {source}: unknown key {unknown[0]!r} for --cluster {kind}; "
                "see cluster_configs/" + (f"{kind}.yaml" if kind != "address" else "README")
            )
    adapt = config.get("adapt") or {}
    if not isinstance(adapt, dict) or set(adapt) - {"minimum", "maximum"}:
        raise ClusterError(
            f"cluster config {source}: 'adapt' must be a mapping with keys minimum and maximum"
        )
    if kind == "kubernetes":
        pod = config.get("pod") or {}
        bad = sorted(set(pod) - _K8S_POD_KEYS) if isinstance(pod, dict) else ["pod"]
        if bad:
            raise ClusterError(
                f"cluster config {source}: unknown key pod.{bad[0]}; "
                f"allowed: {', '.join(sorted(_K8S_POD_KEYS))}"
            )
        # kubernetes_validate does not look inside resources maps: check them here
        resources = config.get("resources") or {}
        bad = sorted(set(resources) - _K8S_RESOURCE_KEYS) if isinstance(resources, dict) else []
        if bad:
            raise ClusterError(
                f"cluster config {source}: unknown key resources.{bad[0]}; use requests and limits"
            )


def _adapt_bounds(request: ClusterRequest, config: dict[str, Any]) -> tuple[int, int] | None:
    adapt = config.get("adapt") or {}
    minimum = request.workers if request.workers is not None else adapt.get("minimum")
    maximum = request.max_workers if request.max_workers is not None else adapt.get("maximum")
    if minimum is None and maximum is None:
        return None
    minimum = int(minimum or 0)
    maximum = int(maximum) if maximum is not None else minimum
    return minimum, max(minimum, maximum)


# ---------------------------------------------------------------------------
# walltime -> worker lifetime
# ---------------------------------------------------------------------------


def walltime_seconds(walltime: str | int, kind: str) -> int:
    """Seconds of a scheduler walltime string.

    SLURM ``[D-]HH:MM:SS``, ``MM`` or ``MM:SS``; PBS/SGE ``HH:MM:SS``; LSF
    ``[HH:]MM``.
    """
    text = str(walltime).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError as exc:
        raise ClusterError(_walltime_msg(walltime, kind)) from exc
    if kind == "lsf":
        weights = {1: [60], 2: [3600, 60]}.get(len(parts))
    elif kind == "slurm":
        weights = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}.get(len(parts))
    else:
        weights = {1: [1], 2: [60, 1], 3: [3600, 60, 1]}.get(len(parts))
    if weights is None:
        raise ClusterError(_walltime_msg(walltime, kind))
    return days * 86400 + sum(p * w for p, w in zip(parts, weights, strict=True))


def _walltime_msg(walltime: object, kind: str) -> str:
    example = "01:00" if kind == "lsf" else "01:00:00"
    return f"cluster config: walltime {walltime!r} is not a time like {example}; fix walltime"


def lifetime_args(walltime_s: int) -> list[str]:
    """``--lifetime`` / ``--lifetime-stagger`` so workers retire before the walltime.

    A margin of 10 % of the walltime (at least 60 s) is kept; the lifetime is
    the walltime minus the margin, the stagger half the margin, so that workers
    started together do not all leave at once. ``00:10:00`` gives ``9m`` / ``30s``.
    """
    margin = max(60, walltime_s // 10)
    lifetime = max(30, walltime_s - margin)

    def fmt(s: int) -> str:
        return f"{s // 60}m" if s % 60 == 0 else f"{s}s"

    return ["--lifetime", fmt(lifetime), "--lifetime-stagger", fmt(max(1, margin // 2))]


# ---------------------------------------------------------------------------
# resolution: request + config -> constructor kwargs
# ---------------------------------------------------------------------------


def _jobqueue_kwargs(request: ClusterRequest, config: dict[str, Any]) -> dict[str, Any]:
    kind = request.kind
    kw = {k: v for k, v in config.items() if k not in _EMFLOW_KEYS and v is not None}
    processes = int(kw.get("processes") or 1)  # worker processes per job
    if request.threads_per_worker is not None:
        kw["cores"] = request.threads_per_worker * processes
    if request.memory_per_worker is not None:
        if processes == 1:
            kw["memory"] = request.memory_per_worker
        else:
            kw["memory"] = f"{_parse_bytes(request.memory_per_worker) * processes}B"
    if request.log_dir is not None and "log_directory" not in kw:
        kw["log_directory"] = str(request.log_dir)
    extra = list(kw.get("worker_extra_args") or [])
    if "walltime" in kw and not any(str(a).startswith("--lifetime") for a in extra):
        extra += lifetime_args(walltime_seconds(kw["walltime"], kind))
    kw["worker_extra_args"] = extra
    sched = dict(kw.get("scheduler_options") or {})
    sched.setdefault("dashboard_address", request.dashboard_address)
    kw["scheduler_options"] = sched
    if not request.insecure and "shared_temp_directory" not in kw:
        shared = request.log_dir or kw.get("log_directory") or Path.cwd()
        kw["shared_temp_directory"] = str(shared)
    return kw


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"--memory-per-worker {text!r} is not a size; use e.g. 4GiB") from exc


def _local_kwargs(request: ClusterRequest, config: dict[str, Any]) -> dict[str, Any]:
    kw = {k: v for k, v in config.items() if k not in _EMFLOW_KEYS}
    if request.workers is not None:
        kw["n_workers"] = request.workers
    if request.threads_per_worker is not None:
        kw["threads_per_worker"] = request.threads_per_worker
    if request.memory_per_worker is not None:
        kw["memory_limit"] = request.memory_per_worker
    kw.setdefault("dashboard_address", request.dashboard_address)
    return kw


def describe(request: ClusterRequest) -> dict[str, Any]:
    """Resolved cluster settings, for ``emflow plan`` to print.

    Nothing is started or submitted.

    Returns
    -------
    dict
        ``kind``, ``config`` (source of the values), ``cluster_class``,
        ``kwargs`` (exactly what the class will receive, security aside),
        ``adapt`` (``{"minimum", "maximum"}`` workers or ``None``) and
        ``security`` (a one-line description).
    """
    config, source = load_config(request)
    out: dict[str, Any] = {"kind": request.kind, "config": source}
    if _is_address(request.kind):
        tls = request.kind.startswith("tls://")
        out.update(
            cluster_class=None,
            kwargs={
                "address": request.kind,
                **{k: v for k, v in config.items() if k != "security"},
            },
            adapt=None,
            security="TLS with certificates from the config's 'security'" if tls else "none (tcp)",
        )
        return out
    bounds = _adapt_bounds(request, config)
    if request.kind in JOBQUEUE_KINDS:
        bounds = bounds or (1, 1)
    elif request.max_workers is None and (config.get("adapt") or {}).get("maximum") is None:
        bounds = None  # fixed size: local n_workers / kubernetes replicas
    out["adapt"] = None if bounds is None else {"minimum": bounds[0], "maximum": bounds[1]}
    if request.kind == "local":
        out.update(
            cluster_class="distributed.LocalCluster",
            kwargs=_local_kwargs(request, config),
            security="none (local cluster)",
        )
    elif request.kind in JOBQUEUE_KINDS:
        out.update(
            cluster_class=f"dask_jobqueue.{_JOBQUEUE_CLASS[request.kind]}",
            kwargs=_jobqueue_kwargs(request, config),
            security=_security_text(request),
        )
    else:
        spec = kubernetes_spec(request)
        out.update(
            cluster_class="dask_kubernetes.operator (DaskCluster resource)",
            kwargs={
                "custom_cluster_spec": spec,
                "namespace": config.get("namespace"),
                "autoscaler": kubernetes_autoscaler(request),
            },
            security=_security_text(request),
        )
    return out


def _security_text(request: ClusterRequest) -> str:
    if request.insecure:
        return "none (--insecure): scheduler port open to anyone who can reach it"
    if request.kind == "kubernetes":
        return "TLS, temporary certificates in a Kubernetes secret"
    return "TLS, temporary certificates (shared_temp_directory) for scheduler, workers, client"


def _warn_insecure(request: ClusterRequest) -> None:
    if request.insecure and request.kind != "local":
        warnings.warn(
            f"--insecure: the {request.kind} scheduler accepts unencrypted, "
            "unauthenticated connections from anyone who can reach its port",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------
# job scripts
# ---------------------------------------------------------------------------

#: Scheduler address shown in :func:`job_script` (the real one is known at start).
SCHEDULER_PLACEHOLDER = "{protocol}://<scheduler-host>:<port>"


def job_script(request: ClusterRequest) -> str | None:
    """The batch script a worker job would run, without submitting anything.

    It is the script dask-jobqueue submits, built with the same job class and
    keyword arguments, except for two placeholders only known once the
    scheduler runs: its address (``tls://<scheduler-host>:<port>``) and the
    random suffix of the temporary certificate files (``XXXXXXXX``).

    Returns
    -------
    str or None
        The script for slurm/lsf/pbs/sge; ``None`` for local, kubernetes and
        scheduler addresses (see :func:`kubernetes_spec`).
    """
    _check_kind(request)
    if request.kind not in JOBQUEUE_KINDS:
        return None
    config, _ = load_config(request)
    kw = _jobqueue_kwargs(request, config)
    import dask_jobqueue
    from distributed.security import Security

    job_cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS[request.kind]).job_cls
    security = None
    protocol = None
    if not request.insecure:
        protocol = "tls://"
        shared = kw["shared_temp_directory"]

        def tmp(key: str) -> str:
            return f"{shared}/.dask-jobqueue.worker.{key}.XXXXXXXX"

        security = Security(
            tls_ca_file=tmp("ca_file"),
            tls_worker_cert=tmp("cert"),
            tls_worker_key=tmp("key"),
            require_encryption=True,
        )
    job_kw = _job_only_kwargs(kw)
    address = SCHEDULER_PLACEHOLDER.format(protocol="tcp" if request.insecure else "tls")
    try:
        job = job_cls(
            address,
            name="dummy-name",
            config_name=request.kind,
            protocol=protocol,
            security=security,
            **job_kw,
        )
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"--cluster {request.kind}: {exc}".splitlines()[0]) from exc
    return job.job_script()


_CLUSTER_ONLY = {
    "n_workers",
    "loop",
    "security",
    "shared_temp_directory",
    "silence_logs",
    "name",
    "asynchronous",
    "dashboard_address",
    "host",
    "scheduler_options",
    "scheduler_cls",
    "protocol",
    "config_name",
}


def _job_only_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k not in _CLUSTER_ONLY}


# ---------------------------------------------------------------------------
# kubernetes
# ---------------------------------------------------------------------------


def kubernetes_spec(request: ClusterRequest) -> dict[str, Any]:
    """The ``DaskCluster`` resource emflow would create on Kubernetes.

    Built by dask-kubernetes' ``make_cluster_spec`` from the config's keyword
    arguments, then customised:

    * the scheduler container gets ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD`` =
      ``emflow.dask_preload`` so the lattice plugin and the ``/emflow``
      dashboard page exist in a scheduler emflow did not start (the image must
      contain emflow);
    * ``pod.volumes`` / ``pod.volumeMounts`` (e.g. a PVC holding the data),
      ``pod.nodeSelector`` and ``pod.tolerations`` go into both pod specs;
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

    scheduler_env = {**user_env, "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": PRELOAD_MODULE}
    worker_env = dict(user_env)
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
        if not container.get("resources"):
            container.pop("resources", None)
    if namespace != "default" or config.get("namespace"):
        spec["metadata"]["namespace"] = namespace
    return spec


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


# ---------------------------------------------------------------------------
# starting clusters
# ---------------------------------------------------------------------------


@contextmanager
def open_client(request: ClusterRequest) -> Iterator[Any]:
    """Start (or connect to) the cluster of ``request`` and yield a ``Client``.

    On exit the client and the cluster are closed; for batch schedulers every
    job this cluster submitted is cancelled, including jobs the adaptive
    scaler already forgot, so no job outlives the run.

    Raises
    ------
    ClusterError
        Unknown kind, bad config file or key, or the cluster cannot start.
    """
    _check_kind(request)
    config, _source = load_config(request)
    _warn_insecure(request)
    if _is_address(request.kind):
        with _address_client(request, config) as client:
            yield client
    elif request.kind == "local":
        with _local_client(request, config) as client:
            yield client
    elif request.kind in JOBQUEUE_KINDS:
        with _jobqueue_client(request, config) as client:
            yield client
    else:
        with _kubernetes_client(request, config) as client:
            yield client


@contextmanager
def _address_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    from distributed.security import Security

    security = None
    if config.get("security"):
        try:
            security = Security(**config["security"])
        except TypeError as exc:
            raise ClusterError(
                f"cluster config: 'security' has a bad key ({exc}); use Security keywords "
                "such as tls_ca_file, tls_client_cert, tls_client_key"
            ) from exc
    elif request.kind.startswith("tls://"):
        security = Security()  # from dask config (distributed.comm.tls.*)
        if not security.tls_ca_file:
            raise ClusterError(
                f"--cluster {request.kind}: a tls:// scheduler needs certificates; set 'security' "
                "(tls_ca_file, tls_client_cert, tls_client_key) in --cluster-config"
            )
    client = _connect(
        request.kind,
        security,
        config.get("timeout", "30s"),
        f"--cluster {request.kind}: cannot reach the scheduler ({{exc}}); check the address "
        "and the certificates",
    )
    try:
        yield client
    finally:
        client.close()


def _connect(address: str, security: Any, timeout: str, message: str) -> Any:
    """``Client(address)``, or :class:`ClusterError` with ``message`` (``{exc}`` filled in).

    A Client whose connection failed closes itself in ``__del__``; if the garbage
    collector runs that while a later Client starts its event loop, both wait on
    the same lock forever (seen with distributed 2026.8). So the failed Client is
    collected here, before the error leaves.
    """
    import gc

    from distributed import Client

    failure = None
    try:
        return Client(address, security=security, timeout=timeout)
    except (OSError, TimeoutError, TypeError, ValueError) as exc:
        failure = message.format(exc=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    gc.collect()
    raise ClusterError(failure)


@contextmanager
def _local_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    kw = _local_kwargs(request, config)
    try:
        cluster = LocalCluster(**kw)
    except TypeError as exc:
        raise ClusterError(f"local cluster config: {exc}; check the keys") from exc
    try:
        bounds = _adapt_bounds(request, config)
        wants = request.max_workers is not None or (config.get("adapt") or {}).get("maximum")
        if wants and bounds is not None:
            cluster.adapt(minimum=bounds[0], maximum=bounds[1])
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _tracking_job_cls(base: type, seen: list[str]) -> type:
    """A subclass of a dask-jobqueue job class that records submitted job ids."""

    async def start(self: Any) -> None:
        await base.start(self)
        if self.job_id:
            seen.append(str(self.job_id))

    return type(f"Emflow{base.__name__}", (base,), {"start": start})


@contextmanager
def _jobqueue_client(request: ClusterRequest, config: dict[str, Any]) -> Iterator[Any]:
    import dask_jobqueue
    from distributed import Client

    cluster_cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS[request.kind])
    kw = _jobqueue_kwargs(request, config)
    if not request.insecure:
        kw["security"] = True  # Security.temporary(); worker files in shared_temp_directory
    submitted: list[str] = []
    kw["job_cls"] = _tracking_job_cls(cluster_cls.job_cls, submitted)
    for key in ("log_directory", "shared_temp_directory"):
        if kw.get(key):
            directory = Path(os.path.expanduser(os.path.expandvars(str(kw[key]))))
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ClusterError(
                    f"cluster config {key} {directory}: cannot create ({exc.strerror}); "
                    "choose a directory on a file system the compute nodes share"
                ) from exc
    try:
        cluster = cluster_cls(**kw)
    except (TypeError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0]
        raise ClusterError(f"--cluster {request.kind}: cannot start ({msg})") from exc
    try:
        low, high = _adapt_bounds(request, config) or (1, 1)
        per_job = int(kw.get("processes") or 1)  # adapt counts jobs; bounds count workers
        cluster.adapt(minimum_jobs=-(-low // per_job), maximum_jobs=-(-high // per_job))
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        try:
            cluster.close()
        finally:
            _reap_jobs(cluster_cls.job_cls.cancel_command, submitted)


def _reap_jobs(cancel_command: str, job_ids: list[str]) -> None:
    """Cancel every job id this run submitted (already-finished ids are harmless)."""
    if not job_ids:
        return
    cmd = [*shlex.split(cancel_command), *sorted(set(job_ids))]
    try:
        subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - best effort
        logger.warning("could not cancel worker jobs %s: %s", job_ids, exc)


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
    from distributed import Client

    try:
        cluster = KubeCluster(custom_cluster_spec=spec, namespace=namespace)
    except Exception as exc:  # kr8s raises several types for missing credentials
        raise ClusterError(
            f"--cluster kubernetes: cannot create the DaskCluster ({str(exc).splitlines()[0]}); "
            "check kubectl access and that the dask-kubernetes operator is installed"
        ) from exc
    try:
        if kubernetes_autoscaler(request) is not None:
            bounds = _adapt_bounds(request, config) or (0, 0)
            cluster.adapt(minimum=bounds[0], maximum=bounds[1])
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
