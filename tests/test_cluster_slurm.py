"""emflow on a real single-node SLURM (``bash .ci/slurm.sh`` starts it; ``pytest -m slurm``).

* a generated recipe runs end to end with two SLURM jobs as workers, over TLS, and
  its output is byte-identical to the same recipe run on a local cluster;
* the job script ``emflow plan`` prints is the one submitted;
* clients without the run's certificates are refused;
* ``scancel`` of a worker job mid-run: the run completes with identical output and
  adapt submits a replacement job;
* no job outlives ``open_client``.
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

api = pytest.importorskip("emflow.api", reason="emflow.api (lead's runner) not importable")

from distributed import Client, get_task_stream  # noqa: E402
from distributed.security import Security  # noqa: E402

from emflow.cluster import ClusterRequest, job_script, open_client  # noqa: E402
from emflow.memory import WORKER_ENV, WORKER_MALLOC  # noqa: E402
from emflow.testing import synthetic_slices, write_stack  # noqa: E402

RUN_FOLDER = "emflow-run"  # emflow.pipeline.RUN_FOLDER: bookkeeping, not output
JOB_NAME = f"emflow-t{uuid.uuid4().hex[:6]}"  # unique, so leak checks see only our jobs


def _slurm_ready() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: run `bash .ci/slurm.sh` first"
    proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a"], capture_output=True,
                          text=True, timeout=20)  # fmt: skip
    if proc.returncode != 0 or "up" not in proc.stdout:
        return f"SLURM partition debug not up ({proc.stderr.strip()}): run `bash .ci/slurm.sh`"
    return None


_why = _slurm_ready()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

# worker jobs cannot import this test module: ship its classes and functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _recipe(src: Path, out: Path) -> dict[str, Any]:
    return {
        "source": {"glob": str(src / "*.png")},
        "voxel_size_nm": [8, 8, 40],
        "output_dir": str(out),
        "outputs": [
            {"format": "precomputed", "name": "em", "encoding": "raw",
             "chunk_size_xyz": [64, 64, 8]},
            {"format": "omezarr", "name": "em.ome.zarr", "chunk_size_xyz": [64, 64, 8]},
        ],
        "align": {"enabled": True, "nfeatures": 500},
        "enhance": {"clip_limit": 0.02, "kernel_size_px": 64},
    }  # fmt: skip


def _digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (the run folder's bookkeeping excluded)."""
    files = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and RUN_FOLDER not in p.relative_to(out).parts
        and p.name != ".emflow-output.json"  # ownership marker: names its own output_dir
    }
    assert files, f"no output files under {out}"
    return files


def _our_jobs(states: str = "PD,R,CF") -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-t", states, "-o", "%i"],
                          capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    return proc.stdout.split()


def _assert_no_jobs_left() -> None:
    deadline = time.monotonic() + 20
    while _our_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _our_jobs() == [], "SLURM worker jobs outlived open_client"


def _slurm_job_ids(client: Client) -> dict[str, str]:
    """Worker address -> SLURM job id it runs in."""
    return client.run(lambda: os.environ.get("SLURM_JOB_ID", "not-in-slurm"))


def _process_environment(names: tuple[str, ...]) -> dict[str, str | None]:
    """Those variables as the worker process started with them (``/proc/self/environ``: what
    glibc read at start, not a later ``os.environ`` change)."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    return {k: env.get(k) for k in names}


def _refused(address: str, security: Security | None) -> bool:
    """True if a Client cannot connect within 3 s.

    The failed Client is garbage-collected at once: collected later, its ``__del__``
    can deadlock with the next Client's start (distributed 2026.8).
    """
    accepted = False
    try:
        Client(address, security=security, timeout=3).close()
        accepted = True
    except (OSError, TimeoutError, TypeError, ValueError):
        pass
    gc.collect()
    return not accepted


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("stack") / "slices"
    write_stack(synthetic_slices((24, 256, 256), seed=7), src, pattern="s_%03d.png")
    return src


@pytest.fixture(scope="module")
def local_digest(stack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("local") / "out"
    request = ClusterRequest("local", workers=2, threads_per_worker=1, dashboard_address=":0")
    with open_client(request) as client:
        api.run(_recipe(stack, out), client=client, progress=False)
    return _digest(out)


@pytest.fixture
def slurm_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterRequest:
    # sbatch passes the driver's environment on to the job: a local nanny of this process
    # (local_digest) left emflow's malloc settings in it, so clear them; the worker jobs must
    # get them from their job script
    for name in (*WORKER_ENV, *WORKER_MALLOC):
        monkeypatch.delenv(name, raising=False)
    site = tmp_path / "site.yaml"
    site.write_text(
        "queue: debug\n"
        "interface: lo\n"  # the single node's workers reach the scheduler on loopback
        "cores: 1\n"
        "memory: 1GiB\n"
        'walltime: "00:10:00"\n'
        "death_timeout: 30\n"
        f"job_name: {JOB_NAME}\n"
    )
    return ClusterRequest(
        "slurm",
        config_path=site,
        workers=2,
        max_workers=2,
        log_dir=tmp_path / "run" / "worker-logs",
        dashboard_address=":0",
    )


@pytest.fixture
def slurm_client(slurm_request: ClusterRequest) -> Iterator[Client]:
    try:
        with open_client(slurm_request) as client:
            client.wait_for_workers(2, timeout=120)
            yield client
    finally:
        _assert_no_jobs_left()


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_recipe_on_two_slurm_jobs_matches_local_over_tls(
    slurm_client: Client,
    slurm_request: ClusterRequest,
    stack: Path,
    local_digest: dict[str, str],
    tmp_path: Path,
) -> None:
    client = slurm_client
    # TLS everywhere: scheduler, workers, this client
    assert client.scheduler.address.startswith("tls://")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(a.startswith("tls://") for a in workers)
    jobs = _slurm_job_ids(client)
    assert len(set(jobs.values())) == 2, jobs
    assert set(jobs.values()) <= set(_our_jobs("R"))
    # each worker process runs with emflow's malloc arenas and thresholds (the job script's
    # exports win over the nanny's MALLOC_TRIM_THRESHOLD_=65536), read back from the kernel
    want = {**WORKER_ENV, **WORKER_MALLOC}
    envs = client.run(_process_environment, tuple(want))
    assert list(envs.values()) == [want, want], envs

    # `emflow plan` shows the script that was submitted (placeholders aside)
    submitted = client.cluster.job_script()
    planned = job_script(slurm_request)
    assert planned is not None
    submitted = submitted.replace(client.scheduler.address, "tls://<scheduler-host>:<port>")
    submitted = re.sub(r"(\.dask-jobqueue\.worker\.\w+?)\.[A-Za-z0-9_]{8}\b", r"\1.XXXXXXXX",
                       submitted)  # fmt: skip
    assert submitted == planned

    out = tmp_path / "slurm-out"
    with get_task_stream(client) as stream:
        api.run(_recipe(stack, out), client=client, progress=False)
    used = {t["worker"] for t in stream.data if str(t["key"]).find("emflow-") >= 0}
    assert len(used) >= 2, f"emflow units ran on {used}; expected both SLURM jobs"
    assert _digest(out) == local_digest
    logs = list(slurm_request.log_dir.glob(f"{JOB_NAME}-*.err"))  # type: ignore[union-attr]
    assert len(logs) >= 2, "each worker job writes its log to the run's worker-logs"


def test_clients_without_the_certificates_are_refused(slurm_client: Client) -> None:
    address = slurm_client.scheduler.address
    host_port = address.split("://", 1)[1]
    attempts = {
        "no certificates": dict(address=address, security=None),
        "another CA": dict(address=address, security=Security.temporary()),
        "plain tcp": dict(address=f"tcp://{host_port}", security=None),
    }
    for what, kw in attempts.items():
        assert _refused(kw["address"], kw["security"]), f"client with {what} was accepted"
    # control: the run's own certificates are accepted
    with Client(address, security=slurm_client.security, timeout=10) as ok:
        assert ok.submit(len, "emflow").result() == 6


def test_scancel_mid_run_completes_identically_and_job_is_replaced(
    slurm_client: Client, stack: Path, local_digest: dict[str, str], tmp_path: Path
) -> None:
    client = slurm_client
    jobs = _slurm_job_ids(client)
    out = tmp_path / "slurm-out"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            api.run(_recipe(stack, out), client=client, progress=False)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        for worker, keys in client.processing().items():
            if any("emflow-" in str(k) for k in keys) and worker in jobs:
                victim = jobs[worker]
                break
        time.sleep(0.1)
    assert victim is not None, "no emflow unit seen processing: run ended too early"
    subprocess.run(["scancel", victim], check=True, timeout=20)
    t_kill = time.monotonic()

    runner.join(timeout=150)
    assert not runner.is_alive(), "run did not finish after scancel"
    assert errors == [], errors
    t_done = time.monotonic() - t_kill
    assert _digest(out) == local_digest

    # adapt replaces the cancelled job (minimum 2 workers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = set(_slurm_job_ids(client).values())
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    replaced_after = time.monotonic() - t_kill
    now = set(_slurm_job_ids(client).values())
    assert victim not in now and len(now) == 2, now
    new_jobs = sorted(now - set(jobs.values()))
    print(
        f"\nscancel {victim}: run finished {t_done:.1f} s later; "
        f"replacement job {new_jobs} up {replaced_after:.1f} s after scancel",
        file=sys.stderr,
    )
