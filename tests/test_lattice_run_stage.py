"""run_stage with a run folder: markers, journal, skip on resume, retries, bad input, pause,
cancel and a SIGKILLed worker — on synthetic units, serially and on a real LocalCluster."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emflow import lattice as lat
from emflow.cli import main as cli_main
from emflow.errors import SourceError
from emflow.lattice.execute import Unit, check_complete, run_stage


# ---- unit functions (module level: workers import them by name)
def write_unit(out: str, i: int, delay: float = 0.0) -> dict:
    """Write one deterministic 64 KiB 'chunk' atomically, like a real unit, and describe it."""
    data = np.random.default_rng(i).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    time.sleep(delay)
    path = Path(out) / f"chunk{i:03d}.bin"
    tmp = path.with_suffix(f".tmp{os.getpid()}{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"i": i, "sha": hashlib.sha256(data).hexdigest()[:16], "pair": (i, i + 1)}


def flaky_unit(counter: str, i: int, fails: int) -> dict:
    """Fail the first ``fails`` attempts (counted in files, so across processes)."""
    d = Path(counter)
    d.mkdir(parents=True, exist_ok=True)
    n = len(list(d.glob(f"{i}.*"))) + 1
    (d / f"{i}.{n}").touch()
    if n <= fails:
        raise RuntimeError(f"transient failure {n} of unit {i}")
    return {"i": i, "attempt": n}


def bad_input_unit(i: int) -> dict:
    if i == 2:
        raise SourceError(f"slice img{i:05d}.png is truncated; re-export it")
    time.sleep(0.05)
    return {"i": i}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("chunk*.bin"))
    }


def _events(run_dir: Path, event: str) -> list[dict]:
    return [r for r in lat.read_journal(run_dir) if r["event"] == event]


@pytest.fixture(scope="module")
def cluster():
    """One worker process with 2 threads (the machine is small and shared)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        yield client


# ---------------------------------------------------------------------------- serial path


def test_serial_markers_journal_and_skip(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, write_unit, (str(out), i)) for i in range(5)]
    first = run_stage("slab", units, run_dir=run_dir, run_id="r")
    assert sorted(first) == list(range(5))
    assert first[3]["pair"] == [3, 4]  # results are JSON round-tripped: same on resume
    assert set(lat.done_markers(run_dir, "slab")) == set(range(5))
    seen = []
    lat.open_run(run_dir, "fp", restart=False)
    again = run_stage(
        "slab", units, run_dir=run_dir, run_id="r", on_result=lambda u, r: seen.append(u.index)
    )
    assert again == first and sorted(seen) == list(range(5))
    assert _events(run_dir, "skipped")[-1]["indices"] == list(range(5))
    assert len(_events(run_dir, "done")) == 5  # nothing redone


def test_serial_retries_then_incomplete_then_resume(tmp_path):
    run_dir, counter = tmp_path / "run", tmp_path / "count"
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, flaky_unit, (str(counter), i, {1: 1, 3: 9}.get(i, 0))) for i in range(5)]
    with pytest.raises(lat.IncompleteRun) as e:
        run_stage("match", units, run_dir=run_dir, run_id="r", retries=2)
    assert e.value.exit_code == 3
    assert [(f["stage"], f["index"], f["attempts"]) for f in e.value.failed] == [("match", 3, 3)]
    assert "match[3] after 3 attempt(s): RuntimeError: transient failure 3 of unit 3" in str(
        e.value
    )
    assert set(lat.done_markers(run_dir, "match")) == {0, 1, 2, 4}  # other units kept going
    # resume: only unit 3 runs again, and now succeeds on its 4th attempt
    lat.open_run(run_dir, "fp", restart=False)
    units[3] = Unit(3, flaky_unit, (str(counter), 3, 3))
    res = run_stage("match", units, run_dir=run_dir, run_id="r", retries=2)
    assert res[3] == {"i": 3, "attempt": 4} and res[1] == {"i": 1, "attempt": 2}
    assert len(list(counter.glob("0.*"))) == 1  # unit 0 was skipped, not rerun


def test_bad_input_stops_at_once_and_is_reraised_unchanged(tmp_path):
    units = [Unit(i, bad_input_unit, (i,)) for i in range(6)]
    with pytest.raises(SourceError, match=r"img00002.png is truncated; re-export it") as e:
        run_stage("stats", units, run_dir=tmp_path, run_id="r", retries=3)
    assert type(e.value) is SourceError
    assert set(lat.done_markers(tmp_path, "stats")) == {0, 1}  # stopped at once: 3.. never ran
    assert _events(tmp_path, "failed")[-1]["attempts"] == 1  # no retry of bad input


def test_keep_going_orphans_downstream_units(tmp_path):
    counter = tmp_path / "c"
    a = [Unit(i, flaky_unit, (str(counter), i, 9 if i == 1 else 0)) for i in range(3)]
    res = run_stage("features", a, run_dir=tmp_path, run_id="orph", keep_going=True)
    assert sorted(res) == [0, 2]
    b = [
        Unit(i, write_unit, (str(tmp_path), i), needs=(("features", i), ("features", i + 1)))
        for i in range(2)
    ]
    res_b = run_stage("match", b, run_dir=tmp_path, run_id="orph", keep_going=True)
    assert res_b == {}  # both pairs touch the failed slice 1
    assert _events(tmp_path, "orphaned")[-1]["indices"] == [0, 1]
    snap = lat.summarize_journal(tmp_path)
    cells = {st["stage"]: st["cells"] for st in snap["runs"][0]["stages"]}
    assert cells == {"features": "dfd", "match": "oo"}
    with pytest.raises(lat.IncompleteRun) as e:
        check_complete("orph", tmp_path)
    assert {(f["stage"], f["index"]) for f in e.value.failed} == {
        ("features", 1),
        ("match", 0),
        ("match", 1),
    }


# ---------------------------------------------------------------------------- on Dask


@pytest.mark.integration
def test_dask_retries_lattice_and_incomplete(cluster, tmp_path):
    run_dir, counter = tmp_path / "run", tmp_path / "count"
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, flaky_unit, (str(counter), i, {2: 1, 5: 9}.get(i, 0))) for i in range(8)]
    with pytest.raises(lat.IncompleteRun) as e:
        run_stage("match", units, client=cluster, run_id="dretry", run_dir=run_dir, retries=1)
    assert [(f["index"], f["attempts"]) for f in e.value.failed] == [(5, 2)]
    snap = cluster.sync(cluster.scheduler.emflow_lattice, run_id="dretry")
    st = snap["runs"][0]["stages"][0]
    assert st["cells"] == "ddeddfdd"  # unit 2 was redone after its first attempt failed
    assert st["counts"]["done"] == 6 and st["counts"]["redone"] == 1 and st["counts"]["failed"] == 1
    (f,) = st["failed"]
    assert f["index"] == 5 and f["attempts"] == 2 and "transient failure 2 of unit 5" in f["error"]
    u2 = cluster.sync(cluster.scheduler.emflow_unit, run_id="dretry", stage="match", index=2)
    assert u2["state"] == "redone" and u2["attempts"] == 2
    assert [h[1] for h in u2["history"]] == [
        "queued",
        "running",
        "failed",
        "queued",
        "running",
        "redone",
    ]
    assert set(lat.done_markers(run_dir, "match")) == {0, 1, 2, 3, 4, 6, 7}
    # the live-run record lets the CLI find this scheduler
    assert lat.read_scheduler_file(run_dir)["address"] == cluster.scheduler.address


@pytest.mark.integration
def test_dask_bad_input_is_reraised_unchanged(cluster, tmp_path):
    units = [Unit(i, bad_input_unit, (i,)) for i in range(8)]
    with pytest.raises(SourceError, match=r"img00002\.png is truncated") as e:
        run_stage(
            "stats", units, client=cluster, run_id="dbad", run_dir=tmp_path, retries=3, window=2
        )
    assert type(e.value) is SourceError
    assert len(lat.done_markers(tmp_path, "stats")) < 8


@pytest.mark.integration
def test_dask_pause_resume_via_cli(cluster, tmp_path, capsys):
    """`emflow pause` stops releasing units: once the running ones finish none starts until
    `emflow resume`; then the stage completes."""
    run_dir, out = tmp_path / "emflow-run", tmp_path / "out"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, write_unit, (str(out), i, 0.25)) for i in range(16)]
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.update(
            res=run_stage("slab", units, client=cluster, run_id="dpause", run_dir=run_dir)
        ),
        daemon=True,
    )
    t.start()

    def stage_snap() -> dict:
        return cluster.sync(cluster.scheduler.emflow_lattice, run_id="dpause")["runs"][0]["stages"][
            0
        ]

    deadline = time.time() + 60
    while not lat.done_markers(run_dir, "slab") and time.time() < deadline:
        time.sleep(0.05)
    assert cli_main(["pause", str(tmp_path)]) == 0
    assert "paused run" in capsys.readouterr().out
    while stage_snap()["counts"]["running"] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let anything already released drain
    while stage_snap()["counts"]["running"] and time.time() < deadline:
        time.sleep(0.05)
    before = stage_snap()
    assert before["counts"]["running"] == 0 and before["counts"]["waiting"] > 0
    time.sleep(2.0)
    after = stage_snap()
    assert after["cells"] == before["cells"], "a unit started while the run was paused"
    assert cli_main(["status", str(tmp_path)]) == 0
    assert "PAUSED" in capsys.readouterr().out
    assert cli_main(["resume", str(tmp_path)]) == 0
    t.join(120)
    assert not t.is_alive() and sorted(box["res"]) == list(range(16))
    assert [r["event"] for r in lat.read_journal(run_dir) if r["event"] in ("pause", "resume")] == [
        "pause",
        "resume",
    ]
    assert _digest(out) == {
        f"chunk{i:03d}.bin": hashlib.sha256(
            np.random.default_rng(i).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
        ).hexdigest()
        for i in range(16)
    }


@pytest.mark.integration
def test_dask_cancel_stops_cleanly_and_resumes(cluster, tmp_path, capsys):
    run_dir, out = tmp_path / "emflow-run", tmp_path / "out"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, write_unit, (str(out), i, 0.2)) for i in range(20)]
    box: dict = {}

    def target() -> None:
        try:
            run_stage("slab", units, client=cluster, run_id="dcancel", run_dir=run_dir)
        except lat.RunCancelled as exc:
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    deadline = time.time() + 60
    while len(lat.done_markers(run_dir, "slab")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert cli_main(["cancel", str(run_dir)]) == 0
    t.join(60)
    assert "exc" in box and box["exc"].exit_code == 3 and "resume" in str(box["exc"])
    done = set(lat.done_markers(run_dir, "slab"))
    assert 2 <= len(done) < 20
    assert _events(run_dir, "cancel")
    # a cancelled run resumes with the units not done
    lat.open_run(run_dir, "fp", restart=False)
    res = run_stage("slab", units, client=cluster, run_id="dcancel2", run_dir=run_dir)
    assert sorted(res) == list(range(20))
    assert set(_events(run_dir, "skipped")[-1]["indices"]) == done


@pytest.mark.integration
def test_sigkill_worker_mid_unit_completes_identically(tmp_path):
    """SIGKILL the worker process running a unit: the nanny restarts it, Dask reruns the unit,
    and every chunk equals the serial run's; the lattice shows the requeue."""
    from distributed import Client, LocalCluster

    serial_out, out, run_dir = tmp_path / "serial", tmp_path / "dist", tmp_path / "run"
    serial_out.mkdir()
    out.mkdir()
    run_stage("slab", [Unit(i, write_unit, (str(serial_out), i)) for i in range(12)], run_id="s")
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, write_unit, (str(out), i, 0.6)) for i in range(12)]
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        pids = client.run(os.getpid)
        lat.ensure_plugin(client)
        box: dict = {}
        t = threading.Thread(
            target=lambda: box.update(
                res=run_stage(
                    "slab", units, client=client, run_id="dkill", run_dir=run_dir, retries=0
                )
            ),
            daemon=True,
        )
        t.start()
        deadline = time.time() + 60
        victim = None
        while victim is None and time.time() < deadline:
            try:
                snap = client.sync(client.scheduler.emflow_lattice, run_id="dkill")
                st = snap["runs"][0]["stages"][0]
            except (IndexError, KeyError, TypeError):
                time.sleep(0.05)
                continue
            if st["counts"]["done"] >= 1 and st["counts"]["running"]:
                i = st["cells"].index("r")
                victim = (
                    i,
                    client.sync(
                        client.scheduler.emflow_unit, run_id="dkill", stage="slab", index=i
                    ),
                )
            else:
                time.sleep(0.05)
        assert victim is not None
        index, unit = victim
        os.kill(pids[unit["worker"]], signal.SIGKILL)
        t_kill = time.time()
        t.join(120)
        assert not t.is_alive() and sorted(box["res"]) == list(range(12))
        u = client.sync(client.scheduler.emflow_unit, run_id="dkill", stage="slab", index=index)
    states = [h[1] for h in u["history"]]
    if states[:3] == ["queued", "running", "done"]:  # it finished just before the signal landed
        assert u["end"] <= t_kill + 0.5 and u["state"] == "done", u
    else:  # the whole truth: started on the killed worker, lost with it, redone elsewhere
        assert u["state"] == "redone" and u["attempts"] >= 2 and u["lost"] == 1
        assert states[:3] == ["queued", "running", "lost"], u["history"]
        assert u["history"][2][2] == unit["worker"]
        recs = list(lat.read_journal(run_dir))
        lost = [r for r in recs if r["event"] == "lost"]
        assert [(r["index"], r["worker"]) for r in lost] == [(index, unit["worker"])]
        starts = [r for r in recs if r["event"] == "start" and r["index"] == index]
        assert [r["attempt"] for r in starts] == [1, 2] and starts[0]["worker"] == unit["worker"]
        (done,) = [r for r in recs if r["event"] == "done" and r["index"] == index]
        assert done["redone"] is True and done["attempts"] == 2
    assert _digest(out) == _digest(serial_out) and len(_digest(out)) == 12
    assert set(lat.done_markers(run_dir, "slab")) == set(range(12))


@pytest.mark.integration
@pytest.mark.parametrize("op", ["emflow_pause", "emflow_cancel"])
def test_no_unit_starts_after_pause_or_cancel_is_acknowledged(cluster, tmp_path, op):
    """With more units handed to the worker than it has threads (queued there), a pause (or
    cancel) sends the queued ones back to waiting at once; no unit starts after the request was answered; after a
    resume every unit is done exactly once."""
    run_dir, out = tmp_path / "emflow-run", tmp_path / "out"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    run_id = f"gate-{op}"
    lat.ensure_plugin(cluster)
    units = [Unit(i, write_unit, (str(out), i, 0.4)) for i in range(14)]
    box: dict = {}

    def target() -> None:
        try:
            box["res"] = run_stage(
                "slab", units, client=cluster, run_id=run_id, run_dir=run_dir, window=8
            )
        except lat.RunCancelled as exc:
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def stage_snap() -> dict:
        snap = cluster.sync(cluster.scheduler.emflow_lattice, run_id=run_id)
        return snap["runs"][0]["stages"][0] if snap["runs"] else {"counts": {}}

    deadline = time.time() + 60
    while time.time() < deadline:
        c = stage_snap()["counts"]
        # 2 threads; the scheduler hands a worker about 1.1 tasks per thread (worker-saturation)
        if c.get("running") == 2 and c.get("queued", 0) >= 1:
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"never saw units queued on the worker: {stage_snap()}")
    queued = [i for i, c in enumerate(stage_snap()["cells"]) if c == "q"]
    cluster.sync(getattr(cluster.scheduler, op), run_id=run_id)
    acked = time.time()
    right_after = stage_snap()
    # the units queued when the request came are back to waiting at once (a unit the driver
    # submitted between the request and its next poll may be queued now: it cannot start)
    queued_after = {i for i, c in enumerate(right_after["cells"]) if c == "q"}
    assert not queued_after & set(queued), (queued, right_after)
    assert right_after["counts"]["running"] <= 2
    if op == "emflow_pause":
        while stage_snap()["counts"]["running"] and time.time() < deadline:
            time.sleep(0.05)
        held = stage_snap()
        # units that finished meanwhile are done; the others wait (or sit queued on the worker
        # until its gate refuses them: queued is not started)
        c = held["counts"]
        assert c["running"] == 0 and c["waiting"] + c["queued"] + c["done"] == 14, c
        assert c["waiting"] + c["queued"] >= 6, c
        cluster.sync(cluster.scheduler.emflow_resume, run_id=run_id)
    t.join(120)
    assert not t.is_alive()
    recs = list(lat.read_journal(run_dir))
    starts = [r for r in recs if r["event"] == "start"]
    paused_starts = [r for r in starts if acked < r["at"]]
    if op == "emflow_cancel":
        assert "exc" in box and not paused_starts, paused_starts  # nothing started after cancel
        assert len(lat.done_markers(run_dir, "slab")) == len(starts) <= 4
    else:
        resumed = min(r["t"] for r in recs if r["event"] == "resume")
        assert all(r["at"] >= resumed - 1.0 for r in paused_starts)  # only after the resume
        assert sorted(box["res"]) == list(range(14))
        done = [r["index"] for r in recs if r["event"] == "done"]
        assert sorted(done) == list(range(14))  # each unit done once
        assert len(starts) == 14  # and started once: refused units never started
    for i in queued:  # units queued on the worker when the request came went back to waiting
        hist = cluster.sync(cluster.scheduler.emflow_unit, run_id=run_id, stage="slab", index=i)[
            "history"
        ]
        states = [h[1] for h in hist]
        # (one may have started in the instant between the look and the request: before the ack)
        started_before = states[1:2] == ["running"] and hist[1][0] <= acked
        assert states[:2] == ["queued", "waiting"] or started_before, (i, hist, acked)


# ---- the start gate on the workers (emflow.lattice.gate): counted in the scheduler
def _count_gate_calls(dask_scheduler) -> None:
    """Count the scheduler's gate round trips and the starts workers report from their table."""
    plugin = dask_scheduler.plugins[lat.PLUGIN_NAME]
    counts = plugin.gate_counts = {"asked": 0, "passed": 0, "refused": 0}
    asked, passed = dask_scheduler.handlers["emflow_gate"], plugin.passed
    plugin.gate_originals = (asked, passed)

    async def counting_gate(**kw):
        counts["asked"] += 1
        return await asked(**kw)

    def counting_passed(**kw):
        counts["passed" if kw["go"] else "refused"] += 1
        passed(**kw)

    dask_scheduler.handlers["emflow_gate"] = counting_gate
    dask_scheduler.stream_handlers["emflow_gate_passed"] = counting_passed


def _gate_counts(dask_scheduler, restore: bool = False) -> dict:
    plugin = dask_scheduler.plugins[lat.PLUGIN_NAME]
    if restore:
        asked, passed = plugin.gate_originals
        dask_scheduler.handlers["emflow_gate"] = asked
        dask_scheduler.stream_handlers["emflow_gate_passed"] = passed
    return dict(plugin.gate_counts)


@pytest.mark.integration
def test_units_start_from_the_workers_gate_table_and_a_hold_still_counts_exactly(
    cluster, tmp_path, monkeypatch
):
    """A unit passes the start gate on its worker without a round trip to the scheduler (the
    table the plugin pushed says "go"); the lattice and journal still see every start, once.
    A stage held by EMFLOW_PAUSE_AFTER asks the scheduler for each unit, so exactly N start;
    after a resume the rest run. A retried unit's attempt number is the scheduler's (it comes
    with the unit's result), so the journal says it was redone."""
    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    lat.ensure_plugin(cluster)
    cluster.run_on_scheduler(_count_gate_calls)
    try:
        res = run_stage(
            "slab", [Unit(i, write_unit, (str(out), i)) for i in range(12)],
            client=cluster, run_id="table", run_dir=run_dir,
        )  # fmt: skip
        assert sorted(res) == list(range(12))
        counts = cluster.run_on_scheduler(_gate_counts)
        assert counts == {"asked": 0, "passed": 12, "refused": 0}, counts
        starts = [r for r in lat.read_journal(run_dir) if r["event"] == "start"]
        assert sorted(r["index"] for r in starts) == list(range(12))
        assert {r["attempt"] for r in starts} == {1} and all(r["worker"] for r in starts)

        # a hold: 3 units start, then the stage is paused until resumed
        monkeypatch.setenv("EMFLOW_PAUSE_AFTER", "slab:3")
        box: dict = {}
        units = [Unit(i, write_unit, (str(out), 100 + i, 0.05)) for i in range(10)]
        t = threading.Thread(
            target=lambda: box.update(res=run_stage(
                "slab", units, client=cluster, run_id="held", run_dir=tmp_path / "run2"
            )),
            daemon=True,
        )  # fmt: skip
        lat.open_run(tmp_path / "run2", "fp", restart=False)
        t.start()
        try:
            deadline = time.time() + 120
            snap: dict = {}
            while time.time() < deadline:
                snap = cluster.sync(cluster.scheduler.emflow_lattice, run_id="held")
                r = snap["runs"][0] if snap["runs"] else {"stages": []}
                st = r["stages"][0] if r["stages"] else None
                if st and "slab" in r["paused_stages"] and st["counts"].get("done", 0) == 3:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"the held stage never settled at 3 done units: {snap}")
            time.sleep(0.5)  # nothing more starts while held
            st = cluster.sync(cluster.scheduler.emflow_lattice, run_id="held")["runs"][0]
            st = st["stages"][0]
            assert st["counts"]["done"] == 3 and st["counts"].get("running", 0) == 0, st["counts"]
            cluster.sync(cluster.scheduler.emflow_resume, run_id="held")
        finally:
            t.join(120)
        assert not t.is_alive() and sorted(box["res"]) == list(range(10))
        held_starts = [r for r in lat.read_journal(tmp_path / "run2") if r["event"] == "start"]
        assert len(held_starts) == 10  # each unit started once
        assert cluster.run_on_scheduler(_gate_counts)["asked"] >= 3

        # a retried unit: its attempt number is the scheduler's
        monkeypatch.delenv("EMFLOW_PAUSE_AFTER")
        units = [Unit(i, flaky_unit, (str(counter), i, int(i == 1))) for i in range(4)]
        res = run_stage("match", units, client=cluster, run_id="table", run_dir=run_dir, retries=1)
        assert res[1] == {"i": 1, "attempt": 2}
        (done,) = [r for r in lat.read_journal(run_dir) if r["event"] == "done"
                   and r["stage"] == "match" and r["index"] == 1]  # fmt: skip
        assert done["attempts"] == 2 and done["redone"]
    finally:
        cluster.run_on_scheduler(_gate_counts, restore=True)
