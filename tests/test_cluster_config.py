"""emflow.cluster: requests, YAML resolution, errors, describe(), the local path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from emflow import cluster
from emflow.cluster import CLUSTER_KINDS, DEFAULTS, ClusterRequest, describe, job_script
from emflow.errors import ClusterError
from emflow.memory import WORKER_ENV, WORKER_MALLOC

REPO = Path(__file__).resolve().parent.parent


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_shipped_yaml_equals_builtin_defaults(kind: str) -> None:
    """An installed emflow (no cluster_configs/) behaves like the repository."""
    shipped = yaml.safe_load((REPO / "cluster_configs" / f"{kind}.yaml").read_text())
    assert shipped == DEFAULTS[kind]


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_builtin_defaults_used_without_shipped_yaml(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.config, "shipped_config_path", lambda kind: None)
    config, source = cluster.load_config(ClusterRequest(kind))
    assert source == "built-in defaults"
    assert config == DEFAULTS[kind]


def test_site_yaml_overlays_defaults_and_accepts_dashed_keys(tmp_path: Path) -> None:
    site = _site(tmp_path, "queue: gpu\ndeath-timeout: 15\nadapt: {maximum: 9}\n")
    config, source = cluster.load_config(ClusterRequest("slurm", config_path=site))
    assert source == str(site)
    assert config["queue"] == "gpu"
    assert config["death_timeout"] == 15
    assert config["adapt"] == {"minimum": 1, "maximum": 9}
    assert config["walltime"] == DEFAULTS["slurm"]["walltime"]


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (ClusterRequest("slurmm"), "--cluster 'slurmm' is unknown"),
        (ClusterRequest("tcp://host"), "not a scheduler address"),
        (ClusterRequest("local", workers=4, max_workers=2), "--max-workers 2 is below"),
        (ClusterRequest("local", workers=-1), "--workers -1 is negative"),
        (ClusterRequest("slurm", config_path=Path("/nonexistent/site.yaml")), "no such file"),
    ],
)
def test_user_errors_are_one_line_cluster_errors(request_: ClusterRequest, fragment: str) -> None:
    with pytest.raises(ClusterError) as info:
        describe(request_)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("queue: [unclosed\n", "invalid YAML"),
        ("- a list\n", "expected a mapping"),
        ("quee: debug\n", "unknown key 'quee' for --cluster slurm"),
        ("adapt: {most: 3}\n", "'adapt' must be a mapping"),
        ("walltime: soon\n", "walltime 'soon'"),
    ],
)
def test_bad_site_yaml_names_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    site = _site(tmp_path, text)
    with pytest.raises(ClusterError) as info:
        job_script(ClusterRequest("slurm", config_path=site))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("walltime", "kind", "seconds", "args"),
    [
        ("00:10:00", "slurm", 600, ["--lifetime", "9m", "--lifetime-stagger", "30s"]),
        ("01:00:00", "pbs", 3600, ["--lifetime", "54m", "--lifetime-stagger", "3m"]),
        ("1-00:00:00", "slurm", 86400, ["--lifetime", "1296m", "--lifetime-stagger", "72m"]),
        ("90", "slurm", 5400, ["--lifetime", "81m", "--lifetime-stagger", "270s"]),
        ("02:00", "lsf", 7200, ["--lifetime", "108m", "--lifetime-stagger", "6m"]),
        ("45", "lsf", 2700, ["--lifetime", "2430s", "--lifetime-stagger", "135s"]),
    ],
)
def test_worker_lifetime_below_walltime(
    walltime: str, kind: str, seconds: int, args: list[str]
) -> None:
    assert cluster.walltime_seconds(walltime, kind) == seconds
    assert cluster.lifetime_args(seconds) == args


def test_user_lifetime_is_kept(tmp_path: Path) -> None:
    site = _site(tmp_path, "worker_extra_args: [--lifetime, 5m]\n")
    kwargs = describe(ClusterRequest("slurm", config_path=site, insecure=True))["kwargs"]
    assert kwargs["worker_extra_args"] == ["--lifetime", "5m"]


def test_describe_jobqueue_maps_command_line_options(tmp_path: Path) -> None:
    out = describe(
        ClusterRequest(
            "slurm",
            workers=2,
            max_workers=6,
            threads_per_worker=3,
            memory_per_worker="12GiB",
            log_dir=tmp_path / "worker-logs",
            dashboard_address=":0",
        )
    )
    assert out["cluster_class"] == "dask_jobqueue.SLURMCluster"
    assert out["adapt"] == {"minimum": 2, "maximum": 6}
    kw = out["kwargs"]
    assert (kw["cores"], kw["memory"], kw["processes"]) == (3, "12GiB", 1)
    assert kw["log_directory"] == str(tmp_path / "worker-logs")
    assert kw["shared_temp_directory"] == str(tmp_path / "worker-logs")
    assert kw["scheduler_options"] == {"dashboard_address": ":0"}
    assert out["security"].startswith("TLS")
    assert describe(ClusterRequest("slurm", insecure=True))["security"].startswith("none")


def test_describe_local_and_address() -> None:
    out = describe(ClusterRequest("local", workers=3, threads_per_worker=2))
    assert out["cluster_class"] == "distributed.LocalCluster"
    assert out["adapt"] is None
    assert out["kwargs"]["n_workers"] == 3
    assert out["kwargs"]["threads_per_worker"] == 2
    out = describe(ClusterRequest("local", workers=1, max_workers=3))
    assert out["adapt"] == {"minimum": 1, "maximum": 3}
    out = describe(ClusterRequest("tcp://10.0.0.5:8786"))
    assert out["kwargs"]["address"] == "tcp://10.0.0.5:8786"
    assert job_script(ClusterRequest("tcp://10.0.0.5:8786")) is None
    assert job_script(ClusterRequest("local")) is None


def test_job_script_submits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan must not call sbatch, nor start a scheduler."""
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"job_script ran a command: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    script = job_script(ClusterRequest("slurm", log_dir=tmp_path))
    assert script is not None and script.startswith("#!/usr/bin/env bash")


@pytest.mark.integration
def test_local_client_runs_work() -> None:
    request = ClusterRequest("local", workers=1, threads_per_worker=1, dashboard_address=":0")
    with cluster.open_client(request) as client:
        assert client.dashboard_link.startswith("http")
        assert client.submit(pow, 3, 4).result() == 81
        assert len(client.scheduler_info()["workers"]) == 1
        assert client.scheduler.address.startswith("tcp://")
        # emflow's malloc settings win over Dask's nanny default (MALLOC_TRIM_THRESHOLD_=65536)
        want = {**WORKER_ENV, **WORKER_MALLOC}
        env = client.run(lambda: {k: os.environ.get(k) for k in want})
        assert list(env.values()) == [want]
    assert client.status == "closed"


#: a driver with the lattice plugin and a finished task: is Bokeh imported before and after the
#: dashboard's first visit, which asks for three pages at once (a process of its own: other
#: tests import Bokeh in this one)
DASHBOARD_VISIT = """
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
from emflow import cluster, lattice
from emflow.cluster import ClusterRequest
from emflow.dashboard import dashboard_url
request = ClusterRequest("local", workers=1, threads_per_worker=1, dashboard_address=":0")

def get(url):
    with urllib.request.urlopen(url, timeout=120) as r:  # follows the first visit's redirect
        return r.status, r.geturl(), r.read().decode()

with cluster.open_client(request) as client:
    lattice.ensure_plugin(client)
    assert client.submit(sum, [1, 2]).result() == 3
    before = "bokeh" in sys.modules
    json_first = get(dashboard_url(client) + "/lattice.json")[0]
    status = client.dashboard_link
    urls = {"status": status, "emflow": dashboard_url(client),
            "individual": status.rsplit("/", 1)[0] + "/individual-progress"}
    with ThreadPoolExecutor(3) as pool:
        pages = dict(zip(urls, pool.map(get, urls.values())))
    after = "bokeh" in sys.modules
    print(json.dumps({"before": before, "after": after, "json_first": json_first,
                      "urls": urls, "pages": pages}))
"""


@pytest.mark.integration
def test_local_dashboard_loads_on_its_first_visit_with_the_lattice_page() -> None:
    """A local run nobody watches never imports Bokeh (~0.6 CPU-s of the driver); the first
    visit, here of three pages at once, loads the Dask pages and the lattice page, each
    answered at its own address after one redirect. The lattice JSON needs no Bokeh."""
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", DASHBOARD_VISIT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["before"] is False and seen["json_first"] == 200
    assert seen["after"] is True
    pages, urls = seen["pages"], seen["urls"]
    for name, (code, url, _) in pages.items():
        assert (code, url) == (200, urls[name]), name
    assert "bokeh" in pages["status"][2].lower() and "bokeh" in pages["individual"][2].lower()
    assert 'href="emflow"' in pages["status"][2]  # Dask's navigation bar lists the page
    assert 'document.title = "emflow: lattice"' in pages["emflow"][2]


def test_insecure_warns_on_non_local() -> None:
    with pytest.warns(UserWarning, match="--insecure"):
        cluster._warn_insecure(ClusterRequest("slurm", insecure=True))


def test_jobqueue_python_is_this_interpreter() -> None:
    script = job_script(ClusterRequest("pbs", insecure=True))
    assert script is not None
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
