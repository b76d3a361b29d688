"""Run a command as a measured process tree: wall, CPU seconds, peak RSS per process.

CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` deltas around the child (it includes
every descendant that was reaped, e.g. Dask worker processes joined by their nanny), with
a psutil poll of the live tree as a cross-check and as the source of per-process peak RSS
(``ru_maxrss`` only knows the largest single descendant). Run one measured command at a
time: the rusage delta is per driver process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from benchmarks.machine import load1


@dataclass
class Measured:
    """What one measured command cost. CPU in seconds, memory in MB (1e6 bytes)."""

    cmd: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user + sys of the whole reaped tree (rusage)
    cpu_poll_s: float  # same from polling live processes (lower bound)
    peak_rss_mb: dict[str, float]  # "role pid" -> peak RSS
    peak_worker_rss_mb: float  # max over non-driver processes (driver if none)
    peak_driver_rss_mb: float
    peak_tree_rss_mb: float  # max of the summed RSS of the tree
    maxrss_child_mb: float  # rusage ru_maxrss of the largest reaped descendant
    load1_before: float
    load1_after: float
    stdout_tail: str = ""
    stderr_tail: str = ""
    result: dict = field(default_factory=dict)  # last JSON line on stdout, if any
    sys_s: float = 0.0  # of cpu_s: kernel time (page faults, page cache, syscalls)

    def to_dict(self) -> dict:
        return asdict(self)


def _role(p: psutil.Process, root_pid: int) -> str:
    if p.pid == root_pid:
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.Error, OSError):
        return "proc"
    if "resource_tracker" in cmd or "semaphore_tracker" in cmd:
        return "tracker"
    if "spawn_main" in cmd or "forkserver" in cmd or "dask" in cmd or "worker" in cmd:
        return "worker"
    return "proc"


def run_measured(
    cmd: list[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 0.05,
) -> Measured:
    """Run ``cmd`` to completion and measure its process tree (never raises on failure)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    l_before = load1()
    t0 = time.perf_counter()
    child = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peaks: dict[int, tuple[str, float]] = {}
    cpu_last: dict[int, float] = {}
    tree_peak = [0.0]
    stop = threading.Event()

    def poll() -> None:
        try:
            root = psutil.Process(child.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0.0
            for p in procs:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss / 1e6
                        ct = p.cpu_times()
                    cpu_last[p.pid] = ct.user + ct.system
                except psutil.Error:
                    continue
                total += rss
                role = peaks.get(p.pid, (None, 0.0))[0] or _role(p, child.pid)
                peaks[p.pid] = (role, max(rss, peaks.get(p.pid, ("", 0.0))[1]))
            tree_peak[0] = max(tree_peak[0], total)
            stop.wait(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result: dict = {}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except ValueError:
                continue
    named = {f"{role} {pid}": round(rss, 1) for pid, (role, rss) in peaks.items()}
    workers = [rss for role, rss in peaks.values() if role in ("worker", "proc")]
    drivers = [rss for role, rss in peaks.values() if role == "driver"]
    if not workers:  # a single-process tool: its only process is the worker
        workers = drivers
    return Measured(
        cmd=[str(c) for c in cmd],
        returncode=child.returncode,
        wall_s=round(wall, 3),
        cpu_s=round(cpu, 3),
        cpu_poll_s=round(sum(cpu_last.values()), 3),
        peak_rss_mb=named,
        peak_worker_rss_mb=round(max(workers, default=0.0), 1),
        peak_driver_rss_mb=round(max(drivers, default=0.0), 1),
        peak_tree_rss_mb=round(tree_peak[0], 1),
        maxrss_child_mb=round(after.ru_maxrss / 1e3, 1),  # KiB on Linux
        load1_before=l_before,
        load1_after=load1(),
        stdout_tail=out[-2000:],
        stderr_tail=err[-3000:],
        result=result,
        sys_s=round(after.ru_stime - before.ru_stime, 3),
    )


def dir_stats(path: str | Path) -> tuple[int, float]:
    """(file count, MB) of everything under ``path``."""
    n, size = 0, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            n += 1
            try:
                size += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return n, size / 1e6
