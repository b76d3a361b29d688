"""End-to-end variants: emflow (as a subprocess), the tensorstore ceiling, and the peers.

Every variant is one measured process tree (benchmarks.proc.run_measured) on the same PNG
stack, followed by a read-back check (benchmarks.quality) and output file counts. Figures
per variant: input MB/s (wall), CPU-s per GB of input, peak RSS per worker, files, MB out,
% of the per-core-derived wall limit and CPU efficiency (benchmarks.limits.cost_model).
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks import venvs
from benchmarks.proc import Measured, dir_stats, run_measured

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_SCRIPTS = HERE / "peer_scripts"

#: output kind -> cost-model key of its limit
LIMIT_KEY = {
    "jpeg": "jpeg",
    "zarr": "zstd",
    "both": "jpeg+zstd",
    "both+clahe": "jpeg+zstd+clahe",
    "full": "full",
    "both-tiff": "jpeg+zstd_tiff",
}
CLAHE = {"clip_limit": 0.02, "kernel_size_px": 1024}  # = limits.CLAHE_*


@dataclass
class Variant:
    """One end-to-end configuration to measure."""

    name: str
    family: str  # emflow | ceiling | peer
    kind: str  # jpeg | zarr | both | both+clahe | full
    format_note: str
    cmd: list[str] = field(default_factory=list)
    out_dir: Path = Path()
    cores: int = 2
    env: dict[str, str] = field(default_factory=dict)
    skip: str = ""  # reason, when it cannot run
    input_bytes: int = 0  # when the variant reads only part of the stack (0: all of it)
    threads: int | None = None  # threads per worker given on the command line (None: default)


# --- builders ---------------------------------------------------------------------------


def emflow_recipe(
    src: Path,
    nz: int,
    out_dir: Path,
    kind: str,
    levels: int | None,
    voxel_nm: float = 8.0,
    slab_depth: int | None = None,
) -> Path:
    """Write the YAML recipe of an emflow variant and return its path.

    ``kind`` ``both-tiff`` reads ``src/img%05d.tif``; ``levels`` None: until one chunk.
    """
    src, out_dir = src.resolve(), out_dir.resolve()
    outputs = []
    if kind in ("jpeg", "both", "both+clahe", "full", "both-tiff"):
        outputs.append(
            {
                "format": "precomputed",
                "name": "precomputed",
                "encoding": "jpeg",
                "jpeg_quality": 90,
                "sharded": True,
            }
        )
    if kind in ("zarr", "both", "both+clahe", "full", "both-tiff"):
        outputs.append(
            {
                "format": "omezarr",
                "name": "omezarr",
                "version": "0.5",
                "codec": "zstd",
                "codec_level": 1,
            }
        )
    ext = "tif" if kind == "both-tiff" else "png"
    recipe: dict = {
        "source": {"pattern": str(src / f"img%05d.{ext}"), "z_start": 0, "z_stop": nz},
        "voxel_size_nm": [voxel_nm] * 3,
        "align": False,  # "full" turns it on below
        "output_dir": str(out_dir),
        "outputs": outputs,
    }
    if levels is not None:
        recipe["pyramid"] = {"levels": levels}
    # emflow's default enables CLAHE: pyramid-only variants switch it off explicitly
    recipe["enhance"] = dict(CLAHE) if kind in ("both+clahe", "full") else {"clip_limit": 0.0}
    if kind == "full":
        recipe["align"] = {"enabled": True}
    if slab_depth is not None:
        recipe["run"] = {"slab_depth": slab_depth}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f"{out_dir.name}.recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def emflow_variant(
    name: str,
    kind: str,
    src: Path,
    nz: int,
    work: Path,
    levels: int | None,
    workers: int | None = None,
    pin_cores: str | None = None,
    slab_depth: int | None = None,
    input_bytes: int = 0,
    threads: int | None = None,
) -> Variant:
    """An ``emflow run`` variant; without ``workers``/``threads``: the default local cluster."""
    out = work / name
    recipe = emflow_recipe(src, nz, out, kind, levels, slab_depth=slab_depth)
    cmd = [sys.executable, "-m", "emflow", "run", str(recipe)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    cmd += ["--dashboard", ":0", "--quiet", "--restart"]
    cores = 2
    if pin_cores is not None:
        cmd = ["taskset", "-c", pin_cores, *cmd]
        cores = len(pin_cores.split(","))
    note = {
        "jpeg": "prec JPEG q90 sharded",
        "zarr": "OME-Zarr 0.5 zstd-1 sharded",
        "both": "JPEG + zstd OME-Zarr, one decode",
        "both+clahe": "both + CLAHE",
        "full": "both + CLAHE + alignment",
        "both-tiff": "JPEG + zstd OME-Zarr from uncompressed TIFF",
    }[kind]
    if slab_depth is not None:
        note += f", slab_depth {slab_depth}"
    return Variant(
        name,
        "emflow",
        kind,
        note,
        cmd,
        out,
        cores,
        env={"PYTHONPATH": str(REPO)},
        input_bytes=input_bytes,
        threads=threads,
    )


def ceiling_variant(kind: str, src: Path, work: Path, levels: int, threads: int = 2) -> Variant:
    fmts = {"jpeg": "jpeg", "zarr": "zarr", "both": "jpeg,zarr"}[kind]
    out = work / f"ceiling-{kind}"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.ceiling",
        str(src),
        str(out),
        "--formats",
        fmts,
        "--threads",
        str(threads),
        "--levels",
        str(levels),
    ]
    note = {
        "jpeg": "prec JPEG q90 sharded",
        "zarr": "OME-Zarr 0.5 zstd-1 sharded",
        "both": "JPEG + zstd OME-Zarr, one decode",
    }[kind]
    return Variant(
        f"ceiling-{kind}", "ceiling", kind, note, cmd, out, env={"PYTHONPATH": str(REPO)}
    )


PEER_VARIANTS = {
    # peer venv -> (variant name, kind, script, format note)
    "igneous": (
        "igneous-jpeg",
        "jpeg",
        "igneous_run.py",
        "prec JPEG q90 unsharded (igneous + CloudVolume)",
    ),
    "ngff-zarr": (
        "ngff-zarr",
        "zarr",
        "ngff_zarr_run.py",
        "OME-Zarr 0.5 zstd-1 sharded (DASK_BIN_SHRINK)",
    ),
    "ome-zarr-py": (
        "ome-zarr-py",
        "zarr",
        "ome_zarr_py_run.py",
        "OME-Zarr 0.5 zstd-1 sharded (local_mean)",
    ),
}


def peer_variant(peer: str, src: Path, work: Path, levels: int) -> Variant:
    name, kind, script, note = PEER_VARIANTS[peer]
    out = work / name
    env = venvs.ensure(peer)
    if not env.ok:
        return Variant(name, "peer", kind, note, [], out, skip=env.note or "venv failed")
    cmd = [str(env.python), str(PEER_SCRIPTS / script), str(src), str(out), "--levels", str(levels)]
    return Variant(name, "peer", kind, note, cmd, out)


# --- measuring ----------------------------------------------------------------------------


def _emflow_log(out_dir: Path) -> dict:
    """Figures emflow logs itself: its run seconds, cluster start, planned slab depth."""
    log = out_dir / "emflow-run" / "run.log"
    info: dict = {}
    if not log.exists():
        return info
    text = log.read_text()
    last = text.rfind(" emflow run ")  # the log is appended to by every run: keep the last
    if last > 0:
        text = text[text.rfind("\n", 0, last) + 1 :]
    m = re.search(r"done in ([0-9.]+) s", text)
    if m:
        info["emflow_run_s"] = float(m.group(1))
    # the plan's stages: "stage slab: 4 units of x 1024 × y 1024 × z 128 (level 0; ...) ...
    # planned 1.01 GiB per unit" (render: "stage render: 16 units of 8 slice(s) ...")
    stages = []
    for name, n, rest in re.findall(r"^stage (\w+): (\d+) units (.*)$", text, re.M):
        m = re.search(r"planned ([0-9.]+) GiB per unit", rest)
        d = {"stage": name, "units": int(n), "planned_gib": float(m.group(1)) if m else None}
        m = re.search(r"of x (\d+) \u00d7 y (\d+) \u00d7 z (\d+) \(level (\d+)", rest)
        if m:
            d["brick_xyz"] = [int(m.group(i)) for i in (1, 2, 3)]
            d["level"] = int(m.group(4))
        stages.append(d)
    if stages:
        info["stages"] = stages
        planned = [d["planned_gib"] for d in stages if d.get("planned_gib")]
        if planned:
            info["planned_unit_mib"] = max(planned) * 1024
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (\S+)", text, re.M)
    if len(stamps) >= 2:
        from datetime import datetime

        def ts(s: str) -> float:
            return datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()

        start = ts(stamps[0][0])
        dash = next((ts(s) for s, w in stamps if w == "dashboard:"), None)
        if dash is not None:
            info["cluster_start_s"] = round(dash - start, 2)
    return info


def _last_session(out_dir: Path) -> list[dict]:
    """The journal records of the run's last session (a resumed run's earlier sessions left
    out; emflow's own reader skips a torn line)."""
    from emflow.lattice.journal import read_journal

    records: list[dict] = []
    for rec in read_journal(out_dir / "emflow-run"):
        if rec.get("event") == "session":
            records = []
        records.append(rec)
    return records


def stages_span_s(out_dir: Path) -> float | None:
    """Seconds from the last session's first ``stage`` event to its last ``stage_end`` (the
    run's units and the hand-offs between stages; not start-up or exit), from the journal."""
    events = _last_session(out_dir)
    starts = [ev["t"] for ev in events if ev.get("event") == "stage"]
    ends = [ev["t"] for ev in events if ev.get("event") == "stage_end"]
    return ends[-1] - starts[0] if starts and ends else None


def _emflow_stages(out_dir: Path) -> dict:
    """Per-stage wall (journal stage -> stage_end) and summed unit phases (done markers)."""
    import json

    run = out_dir / "emflow-run"
    out: dict = {}
    starts: dict[str, float] = {}
    for ev in _last_session(out_dir):
        if ev.get("event") == "stage":
            starts[ev["stage"]] = ev["t"]
        elif ev.get("event") == "stage_end" and ev.get("stage") in starts:
            out.setdefault("stage_wall_s", {})[ev["stage"]] = round(
                ev["t"] - starts[ev["stage"]], 3
            )
    phases: dict[str, float] = {}
    for marker in sorted((run / "done").glob("*/*.json")) if (run / "done").exists() else []:
        try:
            res = json.loads(marker.read_text()).get("result") or {}
        except ValueError:
            continue
        secs = res.get("seconds")
        stage = marker.parent.name
        if isinstance(secs, dict):
            for k, v in secs.items():
                phases[f"{stage}.{k}"] = phases.get(f"{stage}.{k}", 0.0) + float(v)
        elif isinstance(secs, int | float):
            phases[stage] = phases.get(stage, 0.0) + float(secs)
    if phases:
        out["unit_phase_s"] = {k: round(v, 3) for k, v in phases.items()}
    return out


def _default_threads(cores: int) -> int:
    """Threads per worker of emflow's default local cluster on this machine."""
    from emflow.cluster.local import default_local_shape

    return default_local_shape(cores)[1]


def measure_variant(v: Variant, timeout_s: float = 1800.0) -> Measured:
    # Every variant, emflow's too, starts from an empty output folder: deleting the previous
    # repeat's output (0.2 s for 700 MB) is not part of the work measured.
    shutil.rmtree(v.out_dir, ignore_errors=True)
    return run_measured(v.cmd, cwd=REPO, env=v.env, timeout_s=timeout_s)


def summarize_runs(
    v: Variant, runs: list[Measured], input_bytes: int, frame_bytes: int, model: dict
) -> dict:
    """Median figures over repeats (failed runs excluded) + derived ratios."""
    ok = [r for r in runs if r.returncode == 0]
    input_bytes = v.input_bytes or input_bytes
    row: dict = {
        "name": v.name,
        "family": v.family,
        "kind": v.kind,
        "format": v.format_note,
        "input_bytes": v.input_bytes or input_bytes,
        "cores": v.cores,
        "cmd": " ".join(runs[0].cmd) if runs else "",
        "n": len(ok),
        "load1": [r.load1_before for r in runs],
    }
    if not ok:
        err = runs[-1].stderr_tail.strip().splitlines() if runs else []
        row["error"] = " | ".join(err[-4:]) or f"returncode {runs[-1].returncode}"
        return row
    walls = [r.wall_s for r in ok]
    wall = statistics.median(walls)
    cpu = statistics.median([r.cpu_s for r in ok])
    gb = input_bytes / 1e9
    row.update(
        {
            "wall_s": wall,
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "mb_s": input_bytes / 1e6 / wall,
            "cpu_s": cpu,
            "cpu_s_per_gb": cpu / gb,
            "sys_s": statistics.median([r.sys_s for r in ok]),
            "cpu_poll_s": statistics.median([r.cpu_poll_s for r in ok]),
            "peak_worker_rss_mb": max(r.peak_worker_rss_mb for r in ok),
            "peak_driver_rss_mb": max(r.peak_driver_rss_mb for r in ok),
            "peak_tree_rss_mb": max(r.peak_tree_rss_mb for r in ok),
            "phases": ok[0].result,
        }
    )
    key = LIMIT_KEY[v.kind]
    lim = model.get(key)
    if lim:
        limit_mb_s = lim["mb_s_per_core"] * v.cores
        row.update(
            {
                "limit_key": key,
                "limit_mb_s": limit_mb_s,
                "pct_of_limit": row["mb_s"] / limit_mb_s,
                "cpu_efficiency": lim["cpu_s_per_gb"] / row["cpu_s_per_gb"],
            }
        )
    if v.family in ("emflow", "fixed"):
        info = _emflow_log(v.out_dir)
        row.update(info)
        row.update(_emflow_stages(v.out_dir))
        slab = (row.get("stage_wall_s") or {}).get("slab")
        if slab:
            row["mb_s_slab_stage"] = input_bytes / 1e6 / slab
            if lim and v.kind != "full":  # the full run's slab stage excludes alignment
                row["pct_of_limit_slab_stage"] = row["mb_s_slab_stage"] / row["limit_mb_s"]
        if "emflow_run_s" in info:
            row["mb_s_inside_run"] = input_bytes / 1e6 / info["emflow_run_s"]
        if info.get("planned_unit_mib"):
            # peak worker RSS (MB = 1e6 B) over the plan's largest planned unit (MiB);
            # a worker running T units at once is planned at base + T × (unit - base)
            planned_mb = info["planned_unit_mib"] * 2**20 / 1e6
            row["planned_unit_mb"] = planned_mb
            row["rss_per_planned_unit"] = row["peak_worker_rss_mb"] / planned_mb
            from emflow.plan import WORKER_BASE

            threads = v.threads or _default_threads(v.cores)
            base = WORKER_BASE / 1e6
            row["threads_per_worker"] = threads
            row["planned_worker_mb"] = base + threads * (planned_mb - base)
            row["rss_per_planned_worker"] = row["peak_worker_rss_mb"] / row["planned_worker_mb"]
    files, mb = 0, 0.0
    if v.out_dir.exists():
        for child in v.out_dir.iterdir():
            if child.name == "emflow-run":
                continue
            n, m = dir_stats(child) if child.is_dir() else (1, child.stat().st_size / 1e6)
            files, mb = files + n, mb + m
    row["files"], row["out_mb"] = files, mb
    return row


def net_of_fixed(row: dict, fixed: dict, input_bytes: int) -> None:
    """Add figures net of emflow's fixed start-up cost (wall and CPU of the tiny run)."""
    wall = row["wall_s"] - fixed["wall_s"]
    cpu = row["cpu_s"] - fixed["cpu_s"]
    if wall <= 0 or cpu <= 0:
        return
    input_bytes = row.get("input_bytes", input_bytes)
    gb = input_bytes / 1e9
    row["net_wall_s"], row["net_mb_s"] = wall, input_bytes / 1e6 / wall
    row["net_cpu_s_per_gb"] = cpu / gb
    if row.get("limit_mb_s"):
        row["net_pct_of_limit"] = row["net_mb_s"] / row["limit_mb_s"]
        ideal_cpu_s_per_gb = 1000.0 * row["cores"] / row["limit_mb_s"]
        row["net_cpu_efficiency"] = ideal_cpu_s_per_gb / row["net_cpu_s_per_gb"]
