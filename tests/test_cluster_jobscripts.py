"""Job scripts for SLURM, LSF, PBS and SGE, asserted line by line (no scheduler needed).

Each script comes from :func:`emflow.cluster.job_script` for one site YAML; every
line is derived from the YAML and the command-line options, so a change in either
shows up here. The real SLURM submission is compared with the same function in
``test_cluster_slurm.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from emflow.cluster import ClusterRequest, job_script

SITE = """\
queue: {queue}
{account_key}: {account}
walltime: "{walltime}"
cores: 2
memory: 8GiB
interface: ib0
death_timeout: 45
job_name: em-{kind}
job_extra_directives: ["{directive}"]
job_script_prologue: ["module load emflow", "export OMP_NUM_THREADS=1"]
local_directory: /scratch/emflow
"""

SITES = {
    "slurm": dict(queue="long", account_key="account", account="lab42",
                  walltime="02:00:00", directive="--qos=high"),
    "lsf": dict(queue="long", account_key="project", account="lab42",
                walltime="02:00", directive="-R select[avx2]"),
    "pbs": dict(queue="long", account_key="account", account="lab42",
                walltime="02:00:00", directive="-l place=scatter"),
    "sge": dict(queue="long.q", account_key="project", account="lab42",
                walltime="02:00:00", directive="-pe smp 2"),
}  # fmt: skip


def _script(kind: str, tmp_path: Path, insecure: bool = False, **extra: object) -> list[str]:
    site = tmp_path / f"{kind}.yaml"
    site.write_text(SITE.format(kind=kind, **SITES[kind]))
    logs = tmp_path / "run" / "worker-logs"
    request = ClusterRequest(
        kind,
        config_path=site,
        log_dir=logs,
        insecure=insecure,
        **extra,  # type: ignore[arg-type]
    )
    script = job_script(request)
    assert script is not None
    return script.splitlines()


def _worker_line(
    tmp_path: Path,
    threads: int = 2,
    memory: str = "8.00GiB",
    tls: bool = True,
    lifetime: str = "108m",
    stagger: str = "6m",
) -> str:
    logs = tmp_path / "run" / "worker-logs"
    scheme = "tls" if tls else "tcp"
    line = (
        f"{sys.executable} -m distributed.cli.dask_worker {scheme}://<scheduler-host>:<port> "
        f"--name dummy-name --nthreads {threads} --memory-limit {memory} --nanny "
        f"--death-timeout 45 --local-directory /scratch/emflow "
        f"--lifetime {lifetime} --lifetime-stagger {stagger} --interface ib0"
    )
    if tls:
        tmp = f"{logs}/.dask-jobqueue.worker"
        line += (
            f" --protocol tls:// --tls-ca-file {tmp}.ca_file.XXXXXXXX"
            f" --tls-cert {tmp}.cert.XXXXXXXX --tls-key {tmp}.key.XXXXXXXX"
        )
    return line


# emflow appends its malloc settings (emflow.memory.WORKER_ENV, WORKER_MALLOC) to the site
# prologue: the job's environment wins over the nanny's MALLOC_TRIM_THRESHOLD_=65536
PROLOGUE = [
    "module load emflow",
    "export OMP_NUM_THREADS=1",
    "export MALLOC_ARENA_MAX=1",
    "export MALLOC_MMAP_THRESHOLD_=33554432",
    "export MALLOC_TRIM_THRESHOLD_=268435456",
    # Dask's tick and worker profile samples made rarer (emflow.cluster.quiet)
    "export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=100ms",
    "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s",
]


def test_slurm_script(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "worker-logs"
    assert _script("slurm", tmp_path) == [
        "#!/usr/bin/env bash",
        "",
        "#SBATCH -J em-slurm",
        f"#SBATCH -e {logs}/em-slurm-%J.err",
        f"#SBATCH -o {logs}/em-slurm-%J.out",
        "#SBATCH -p long",
        "#SBATCH -A lab42",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=8G",
        "#SBATCH -t 02:00:00",
        "#SBATCH --qos=high",
        *PROLOGUE,
        _worker_line(tmp_path),
    ]
    assert logs.is_dir()  # jobs cannot write logs into a missing directory


def test_lsf_script(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "worker-logs"
    assert _script("lsf", tmp_path) == [
        "#!/usr/bin/env bash",
        "",
        "#BSUB -J em-lsf",
        f"#BSUB -e {logs}/dummy-name-%J.err",
        f"#BSUB -o {logs}/dummy-name-%J.out",
        "#BSUB -q long",
        '#BSUB -P "lab42"',
        "#BSUB -n 2",
        '#BSUB -R "span[hosts=1]"',
        "#BSUB -M 8590",  # 8 GiB in MB (lsf_units: MB in the shipped defaults)
        "#BSUB -W 02:00",
        "#BSUB -R select[avx2]",
        *PROLOGUE,
        _worker_line(tmp_path),
    ]


def test_pbs_script(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "worker-logs"
    assert _script("pbs", tmp_path) == [
        "#!/usr/bin/env bash",
        "",
        "#PBS -N em-pbs",
        "#PBS -q long",
        "#PBS -A lab42",
        "#PBS -l select=1:ncpus=2:mem=8192MB",
        "#PBS -l walltime=02:00:00",
        f"#PBS -e {logs}/",
        f"#PBS -o {logs}/",
        "#PBS -l place=scatter",
        *PROLOGUE,
        _worker_line(tmp_path),
    ]


def test_sge_script(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "worker-logs"
    assert _script("sge", tmp_path) == [
        "#!/usr/bin/env bash",
        "",
        "#$ -N em-sge",
        "#$ -q long.q",
        "#$ -P lab42",
        "#$ -l h_rt=02:00:00",
        f"#$ -e {logs}/",
        f"#$ -o {logs}/",
        "#$ -cwd",
        "#$ -j y",
        "#$ -pe smp 2",
        *PROLOGUE,
        _worker_line(tmp_path),
    ]


@pytest.mark.parametrize("kind", ["slurm", "lsf", "pbs", "sge"])
def test_command_line_options_override_yaml(kind: str, tmp_path: Path) -> None:
    lines = _script(kind, tmp_path, insecure=True, threads_per_worker=4,
                    memory_per_worker="16GiB")  # fmt: skip
    assert lines[-1] == _worker_line(tmp_path, threads=4, memory="16.00GiB", tls=False)
    header = "\n".join(lines)
    expected = {
        "slurm": ["#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G"],
        "lsf": ["#BSUB -n 4", "#BSUB -M 17180"],
        "pbs": ["#PBS -l select=1:ncpus=4:mem=16GB"],
        "sge": [],  # SGE requests resources only through resource_spec
    }[kind]
    for line in expected:
        assert line in lines, header
    assert "tls" not in header


def test_sge_resource_spec_passes_through(tmp_path: Path) -> None:
    site = tmp_path / "sge.yaml"
    site.write_text('resource_spec: "h_vmem=8G,mem_req=8G"\nqueue: all.q\n')
    script = job_script(ClusterRequest("sge", config_path=site, insecure=True))
    assert script is not None
    assert "#$ -l h_vmem=8G,mem_req=8G" in script.splitlines()


def test_default_scripts_have_lifetime_and_one_process(tmp_path: Path) -> None:
    for kind in ("slurm", "lsf", "pbs", "sge"):
        script = job_script(ClusterRequest(kind, log_dir=tmp_path))
        assert script is not None
        worker = script.splitlines()[-1]
        assert "--lifetime 54m --lifetime-stagger 3m" in worker
        assert "--nworkers" not in worker  # processes=1: one worker per job
        assert "--nthreads 1 --memory-limit 4.00GiB" in worker
