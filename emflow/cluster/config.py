"""Cluster requests and their configuration: kinds, defaults, site YAML, validation.

The core representation is a :class:`ClusterRequest` (what ``--cluster`` and its
options say) plus a flat ``config`` mapping: the built-in :data:`DEFAULTS` of the
kind, overlaid with the shipped ``cluster_configs/<kind>.yaml`` or a site YAML,
whose keys are the cluster class's keyword arguments plus emflow's own
(``adapt``; ``namespace``, ``pod``, ``tls_secret`` for kubernetes). Also here:
``adapt`` bounds and the walltime -> worker ``--lifetime`` helpers. Nothing in
this module starts a cluster.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emflow.errors import ClusterError

CLUSTER_KINDS = ("local", "slurm", "lsf", "pbs", "sge", "kubernetes")
JOBQUEUE_KINDS = ("slurm", "lsf", "pbs", "sge")

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
        "image": "emflow:0.1.0",  # built from the repository's Dockerfile (README: Kubernetes)
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
        "pod": {
            "volumes": [],
            "volumeMounts": [],
            "nodeSelector": {},
            "tolerations": [],
            "envFrom": [],
        },
        "adapt": {"minimum": None, "maximum": None},
    },
}

_EMFLOW_KEYS = {"adapt"}
_K8S_EMFLOW_KEYS = {"adapt", "namespace", "pod", "tls_secret"}
_K8S_POD_KEYS = {"volumes", "volumeMounts", "nodeSelector", "tolerations", "envFrom"}
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
        Directory for worker job logs (the run folder's ``worker-logs``).
    secrets_dir : Path, optional
        The run folder's ``secrets`` (mode 0700): temporary TLS certificates of the
        worker jobs go there when the YAML sets no ``shared_temp_directory``; removed
        when the cluster closes, or by the next driver when this one died. None: they
        go to ``log_dir``.
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
    secrets_dir: Path | None = None


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
    # emflow/cluster/config.py -> <repository>/cluster_configs/
    path = Path(__file__).resolve().parents[2] / "cluster_configs" / f"{kind}.yaml"
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
    if kind == "local":  # LocalCluster forwards keys it does not know to Nanny and Worker
        from distributed import LocalCluster, Nanny, Worker

        names = set()
        for fn in (LocalCluster.__init__, Nanny.__init__, Worker.__init__):
            names |= set(inspect.signature(fn).parameters)
        return (names - {"self", "args", "kwargs"}) | _EMFLOW_KEYS
    return None


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
