"""Scheduling overhead of a huge run: a simulated 100,000-slice plan with no-op units.

Run as its own process (the driver) by ``python -m benchmarks.overhead``. It starts a Dask
scheduler and N one-thread workers as separate processes (so scheduler memory is measured
apart from the driver's), then:

1. plans: a SliceCatalog of ``slices`` fake 2048² PNG refs (no files) and emflow's own
   ``plan.plan_output`` (levels, slabs, coarse passes), plus one no-op ``Unit`` per
   slice (the per-slice stages, e.g. features) -- time and driver memory;
2. runs that stage through ``emflow.lattice.execute.run_stage`` (bounded window, keys
   ``("emflow-<stage>-<run>", i)``; with 100,000 units on 2 threads run_stage runs
   ``batch`` consecutive units per task, keyed ``("emflow-<stage>-<run>", (i, ...))``) and
   stops it after ``units`` results: time to the first result (first window submitted + one
   round trip), units/s after that;
3. runs the same stage again without a run folder (no done markers, no journal):
   ``no_run_dir``, the cost of the markers by difference;
4. reports the CPU-seconds per unit of driver, scheduler and workers (a figure that
   survives a loaded machine better than wall time), peak RSS of driver and scheduler
   (polled) and the extrapolated overhead for all units. Without emflow's planner it falls
   back to a plain-Dask bounded window (noted).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def noop(i: int) -> int:
    """A unit that does nothing (returns its index)."""
    return i


class _Stop(Exception):
    pass


class _TimedClient:
    """Forward to a Client; note when the ``window``-th unit has been submitted (submit or map)."""

    def __init__(self, client: object, window: int) -> None:
        self._client, self._window, self.n = client, window, 0
        self.t0 = time.perf_counter()
        self.window_submitted_s: float | None = None

    def _count(self, n: int) -> None:
        before, self.n = self.n, self.n + n
        if before < self._window <= self.n:
            self.window_submitted_s = time.perf_counter() - self.t0

    def submit(self, *args: object, **kwargs: object) -> object:
        fut = self._client.submit(*args, **kwargs)  # type: ignore[attr-defined]
        self._count(1)
        return fut

    def map(self, *args: object, **kwargs: object) -> list:
        futs = self._client.map(*args, **kwargs)  # type: ignore[attr-defined]
        self._count(len(futs))
        return futs

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)


class _Peak:
    """Poll the RSS of some pids in a thread; keep the maxima (MB)."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.05) -> None:
        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._every = every_s
        self._t.start()

    def _run(self) -> None:
        procs = {k: psutil.Process(p) for k, p in self.pids.items()}
        while not self._stop.is_set():
            for k, p in procs.items():
                try:
                    self.peak[k] = max(self.peak[k], p.memory_info().rss / 1e6)
                except psutil.Error:
                    pass
            self._stop.wait(self._every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def _start_cluster(workers: int, tmp: Path) -> tuple[list[subprocess.Popen], str]:
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(sched_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    for _ in range(200):
        if sched_file.exists() and sched_file.stat().st_size:
            break
        time.sleep(0.05)
    for i in range(workers):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--name",
                    f"w{i}",
                    "--dashboard-address",
                    ":0",
                    "--local-directory",
                    str(tmp),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=os.getcwd(),
            )
        )
    return procs, str(sched_file)


def _default_window(client: object) -> int:
    """run_stage's default window for this client (older emflow: two per worker thread)."""
    try:
        from emflow.lattice.execute import _window

        return _window(client)
    except ImportError:
        return max(2, 2 * sum(client.nthreads().values()))  # type: ignore[attr-defined]


def _rate(times: list[float], slices: int) -> dict:
    """units/s and ms per unit between the first and the last result."""
    if len(times) < 2:
        return {}
    rate = (len(times) - 1) / (times[-1] - times[0])
    return {
        "units_per_s": round(rate, 1),
        "ms_per_unit": round(1000 / rate, 3),
        "extrapolated_all_units_s": round(slices / rate, 1),
    }


def _cpu_s(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU-seconds (user + system) used so far by each group of processes."""
    out = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


def _cpu_per_unit(before: dict[str, float], after: dict[str, float], n: int) -> dict:
    """CPU ms per unit of each process group between two :func:`_cpu_s` readings (load-proof)."""
    per = {k: round(1000 * (after[k] - before[k]) / max(1, n), 3) for k in before}
    per["total"] = round(sum(per.values()), 3)
    return per


def _run_units(
    client: object,
    unit_list: list,
    units: int,
    window: int,
    run_dir: Path | None,
    have_emflow: bool,
    tag: str = "",
) -> tuple[_TimedClient, list[float]]:
    """Run the no-op stage until ``units`` results arrived; seconds of each from the start."""
    times: list[float] = []
    timed = _TimedClient(client, window=window)
    t1 = timed.t0

    def on_result(_unit: object, _res: object) -> None:
        times.append(time.perf_counter() - t1)
        if len(times) >= units:
            raise _Stop

    if have_emflow:
        from emflow.lattice.execute import run_stage

        kw = {}
        if run_dir is not None and "run_dir" in inspect.signature(run_stage).parameters:
            kw["run_dir"] = run_dir
        try:
            run_stage(
                "noop", unit_list, client=timed, run_id=f"bench{tag}", on_result=on_result, **kw
            )
        except _Stop:
            pass
        return timed, times
    from distributed import as_completed

    it = iter(unit_list)
    ac = as_completed([timed.submit(noop, next(it), pure=False) for _ in range(window)])
    try:
        for fut in ac:
            fut.release()
            on_result(None, None)
            ac.add(client.submit(noop, next(it), pure=False))
    except _Stop:
        pass
    return timed, times


def run(slices: int, units: int, workers: int) -> dict:
    from distributed import Client

    me = psutil.Process()
    rss0 = me.memory_info().rss / 1e6
    out: dict = {"slices": slices, "units_run": units, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="emflow-overhead-") as td:
        tmp = Path(td)
        procs, sched_file = _start_cluster(workers, tmp)
        try:
            client = Client(scheduler_file=sched_file, timeout="60s")
            client.wait_for_workers(workers, timeout=60)
            peak = _Peak({"driver": os.getpid(), "scheduler": procs[0].pid})
            out["rss_idle_mb"] = {
                "driver": round(me.memory_info().rss / 1e6, 1),
                "scheduler": round(psutil.Process(procs[0].pid).memory_info().rss / 1e6, 1),
            }
            # 1. plan
            t0 = time.perf_counter()
            planner = "emflow.plan.plan_output + emflow.lattice.execute.run_stage"
            try:
                from emflow.discover import SliceCatalog, SliceRef
                from emflow.lattice.execute import Unit
                from emflow.plan import plan_output
                from emflow.recipe import recipe_from_dict

                recipe = recipe_from_dict(
                    {
                        "source": {
                            "pattern": "/nonexistent/img%06d.png",
                            "z_start": 0,
                            "z_stop": slices,
                        },
                        "voxel_size_nm": [8, 8, 8],
                        "align": False,
                        "output_dir": str(tmp / "out"),
                        "outputs": [{"format": "precomputed"}, {"format": "omezarr"}],
                    }
                )
                cat = SliceCatalog(
                    tuple(SliceRef(z, z, f"/nonexistent/img{z:06d}.png") for z in range(slices)),
                    (2048, 2048),
                    "uint8",
                    (),
                )
                plan = plan_output(recipe, len(cat.slices), cat.shape_yx, cat.dtype)
                unit_list = [Unit(i, noop, (i,), 2048 * 2048) for i in range(slices)]
                out["plan"] = {
                    "levels": len(plan.levels),
                    "slab_depth": plan.slab_depth,
                    "stages": {name: n for name, n, _ in plan.stages()},
                }
                have_emflow = True
            except ImportError as exc:
                planner = f"plain Dask window (emflow planner missing: {exc})"
                unit_list = list(range(slices))
                have_emflow = False
            out["plan_s"] = round(time.perf_counter() - t0, 3)
            out["driver_rss_after_plan_mb"] = round(me.memory_info().rss / 1e6, 1)
            out["driver_plan_growth_mb"] = round(out["driver_rss_after_plan_mb"] - rss0, 1)
            out["planner"] = planner
            # 2. run the per-slice stage through the window, stop after `units` results:
            # with the run folder (done marker per unit: what a run does), then without
            window = _default_window(client)
            groups = {
                "driver": [os.getpid()],
                "scheduler": [procs[0].pid],
                "workers": [p.pid for p in procs[1:]],
            }
            cpu0 = _cpu_s(groups)
            timed, times = _run_units(client, unit_list, units, window, tmp / "run", have_emflow)
            out["cpu_ms_per_unit"] = _cpu_per_unit(cpu0, _cpu_s(groups), len(times))
            out["window"] = window
            try:  # units per task run_stage chose for this stage (older emflow: one)
                from emflow.lattice.execute import _threads, batch_size

                out["batch"] = batch_size(len(unit_list), _threads(client))
            except ImportError:
                out["batch"] = 1
            out["first_window_submitted_s"] = (
                round(timed.window_submitted_s, 4) if timed.window_submitted_s is not None else None
            )
            out["first_result_s"] = round(times[0], 4) if times else None
            out["plan_plus_first_window_s"] = round(out["plan_s"] + (times[0] if times else 0), 3)
            out.update(_rate(times, slices))
            if have_emflow:
                cpu0 = _cpu_s(groups)
                _, times = _run_units(client, unit_list, units, window, None, have_emflow, "b")
                out["no_run_dir"] = _rate(times, slices)
                out["no_run_dir"]["cpu_ms_per_unit"] = _cpu_per_unit(
                    cpu0, _cpu_s(groups), len(times)
                )
            client.cancel(list(client.futures.values()) if hasattr(client, "futures") else [])
            out["peak_rss_mb"] = peak.stop()
            client.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="no-op unit overhead on a simulated plan")
    p.add_argument("--slices", type=int, default=100_000)
    p.add_argument("--units", type=int, default=2000, help="units to run before stopping")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    print(json.dumps(run(a.slices, a.units, a.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
