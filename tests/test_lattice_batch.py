"""Batch tasks of the lattice: one Dask task runs k units of a stage in order, each with its
own gate check, done marker, result and journal records (emflow.lattice.execute.durable_batch),
on a real LocalCluster; a failed unit, a held (paused) stage and a SIGKILLed worker redo only
the units of a batch that did not finish."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from emflow import lattice as lat
from emflow.lattice import execute
from emflow.lattice.execute import Unit, batch_size, run_stage
from emflow.lattice.plugin import parse_batch


def chunk(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, 1 << 14, dtype=np.uint8).tobytes()


def counted_unit(out: str, counter: str, i: int, delay: float = 0.0, fails: int = 0) -> dict:
    """Write one deterministic chunk; count every attempt in ``counter`` (across processes);
    fail the first ``fails`` attempts; return the Dask key of the task it ran in."""
    from distributed import get_worker

    d = Path(counter)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{i}.{uuid.uuid4().hex}").touch()
    n = len(list(d.glob(f"{i}.*")))
    if n <= fails:
        raise RuntimeError(f"transient failure {n} of unit {i}")
    time.sleep(delay)
    path = Path(out) / f"chunk{i:03d}.bin"
    tmp = path.with_suffix(f".tmp{os.getpid()}{threading.get_ident()}")
    tmp.write_bytes(chunk(i))
    os.replace(tmp, path)
    return {"i": i, "key": repr(get_worker().get_current_task())}


def attempts(counter: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in counter.iterdir():
        i = int(p.name.split(".")[0])
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


def expected(n: int) -> dict[str, str]:
    return {f"chunk{i:03d}.bin": hashlib.sha256(chunk(i)).hexdigest() for i in range(n)}


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("chunk*"))}


def events(run_dir: Path, event: str) -> list[dict]:
    return [r for r in lat.read_journal(run_dir) if r["event"] == event]


def stage_snap(client, run_id: str) -> dict:
    snap = client.sync(client.scheduler.emflow_lattice, run_id=run_id)
    return snap["runs"][0]["stages"][0] if snap["runs"] and snap["runs"][0]["stages"] else {}


def worker_running(client, run_id: str, index: int) -> str:
    """The address of the worker running unit ``index`` of ``run_id``'s slab stage, once the
    units before it are done and it runs (the stage's cells begin ``d...dr``)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        if stage_snap(client, run_id).get("cells", "")[: index + 1] == "d" * index + "r":
            unit = client.sync(
                client.scheduler.emflow_unit, run_id=run_id, stage="slab", index=index
            )
            return unit["worker"]
        time.sleep(0.02)
    raise AssertionError(f"unit {index} did not run: {stage_snap(client, run_id)}")


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


def test_batch_size_batches_only_stages_with_thousands_of_units_per_thread():
    assert execute.BATCH_FROM == 1000 and execute.BATCH_MAX == 16
    assert batch_size(40, 2) == 1  # ordinary runs: a task per unit
    assert batch_size(500, 1) == 1
    assert batch_size(1999, 1) == 1
    assert batch_size(2000, 1) == 2
    assert batch_size(4000, 2) == 2
    assert batch_size(10_000, 2) == 5
    assert batch_size(100_000, 2) == 16  # the 100,000-slice simulation
    assert batch_size(100_000, 0) == 16
    assert execute.batch_key("slab", "r", [4, 5, 6]) == ("emflow-slab-r", (4, 5, 6))
    # the same units submitted again: a key of their own (see the test of a failing first unit)
    assert execute.batch_key("slab", "r", [4, 5, 6], 2) == ("emflow-slab-r", (4, 5, 6), 2)
    known = {"emflow-slab-r": ("r", "slab")}
    assert parse_batch(("emflow-slab-r", (4, 5, 6), 2), known) == ("r", "slab", (4, 5, 6))
    assert parse_batch(("emflow-slab-r", (4, 5, 6)), known) == ("r", "slab", (4, 5, 6))
    assert parse_batch(("emflow-slab-r", (4, 5, 6), "x"), known) is None


@pytest.mark.integration
def test_every_unit_of_a_batch_has_its_marker_result_and_journal_records(cluster, tmp_path):
    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, counted_unit, (str(out), str(counter), i)) for i in range(10)]
    res = run_stage("slab", units, client=cluster, run_id="b1", run_dir=run_dir, batch=4)
    assert sorted(res) == list(range(10))
    # units 0-3, 4-7 and 8-9 ran in three tasks, keyed by their units
    groups = [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    for g in groups:
        for i in g:
            assert res[i] == {"i": i, "key": repr(("emflow-slab-b1", g))}
    markers = lat.done_markers(run_dir, "slab")
    assert sorted(markers) == list(range(10))
    assert all(markers[i]["result"] == res[i] and markers[i]["worker"] for i in range(10))
    starts, dones = events(run_dir, "start"), events(run_dir, "done")
    assert sorted(r["index"] for r in starts) == list(range(10))
    assert {r["attempt"] for r in starts} == {1} and all(r["worker"] for r in starts)
    assert sorted(r["index"] for r in dones) == list(range(10))
    assert {r["attempts"] for r in dones} == {1} and not any(r.get("redone") for r in dones)
    st = stage_snap(cluster, "b1")
    assert st["cells"] == "d" * 10 and st["counts"]["done"] == 10
    assert attempts(counter) == dict.fromkeys(range(10), 1)
    assert digest(out) == expected(10)
    # a resumed run skips every unit (the markers of a batch are the units' own)
    lat.open_run(run_dir, "fp", restart=False)
    again = run_stage("slab", units, client=cluster, run_id="b1r", run_dir=run_dir, batch=4)
    assert again == res and events(run_dir, "skipped")[-1]["indices"] == list(range(10))
    assert attempts(counter) == dict.fromkeys(range(10), 1)


@pytest.mark.integration
def test_a_failed_unit_of_a_batch_is_retried_alone_and_the_others_run_once(cluster, tmp_path):
    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, counted_unit, (str(out), str(counter), i, 0.0, int(i == 5))) for i in range(8)]
    res = run_stage(
        "match", units, client=cluster, run_id="bfail", run_dir=run_dir, batch=4, retries=1
    )
    assert sorted(res) == list(range(8))
    assert attempts(counter) == {**dict.fromkeys(range(8), 1), 5: 2}
    failed = events(run_dir, "failed")
    assert [(r["index"], r["attempts"], r["final"]) for r in failed] == [(5, 1, False)]
    assert "transient failure 1 of unit 5" in failed[0]["error"]
    (done5,) = [r for r in events(run_dir, "done") if r["index"] == 5]
    assert done5["attempts"] == 2 and done5["redone"] is True
    assert stage_snap(cluster, "bfail")["cells"] == "dddddedd"
    assert sorted(lat.done_markers(run_dir, "match")) == list(range(8))
    assert digest(out) == expected(8)

    # without retries: the stage is incomplete with unit 9 alone; 8, 10 and 11 are done
    units = [
        Unit(i, counted_unit, (str(out), str(counter), i, 0.0, 9 * (i == 9))) for i in range(8, 12)
    ]
    with pytest.raises(lat.IncompleteRun) as e:
        run_stage("late", units, client=cluster, run_id="bfail2", run_dir=run_dir, batch=4)
    assert [(f["index"], f["attempts"]) for f in e.value.failed] == [(9, 1)]
    assert sorted(lat.done_markers(run_dir, "late")) == [8, 10, 11]
    assert {i: attempts(counter)[i] for i in (8, 9, 10, 11)} == {8: 1, 9: 1, 10: 1, 11: 1}


@pytest.mark.integration
def test_a_held_batched_stage_starts_exactly_n_units_then_the_rest_after_resume(
    cluster, tmp_path, monkeypatch
):
    """EMFLOW_PAUSE_AFTER=slab:3 on a stage of batches of 4: the gate refuses the 4th unit of
    the first batch and the units after it (they return without running and are submitted
    again after the resume); each unit starts once."""
    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    monkeypatch.setenv("EMFLOW_PAUSE_AFTER", "slab:3")
    units = [Unit(i, counted_unit, (str(out), str(counter), i, 0.05)) for i in range(12)]
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.update(
            res=run_stage("slab", units, client=cluster, run_id="bheld", run_dir=run_dir, batch=4)
        ),
        daemon=True,
    )
    t.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            st = stage_snap(cluster, "bheld")
            if st and st["counts"].get("done", 0) == 3 and not st["counts"].get("running"):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the held stage never settled at 3 done: {stage_snap(cluster, 'bheld')}")
        time.sleep(0.5)  # nothing more starts while held
        st = stage_snap(cluster, "bheld")
        assert st["counts"]["done"] == 3 and not st["counts"].get("running"), st["counts"]
        assert len(lat.done_markers(run_dir, "slab")) == 3 and sum(attempts(counter).values()) == 3
        cluster.sync(cluster.scheduler.emflow_resume, run_id="bheld")
    finally:
        t.join(120)
    assert not t.is_alive() and sorted(box["res"]) == list(range(12))
    assert attempts(counter) == dict.fromkeys(range(12), 1)  # each unit ran once
    assert sorted(r["index"] for r in events(run_dir, "start")) == list(range(12))
    assert sorted(r["index"] for r in events(run_dir, "done")) == list(range(12))
    assert digest(out) == expected(12)


@pytest.mark.integration
def test_a_batch_lost_with_its_worker_redoes_only_its_unfinished_units(tmp_path):
    """SIGKILL the worker in the middle of a batch: Dask runs the batch again elsewhere; its
    units that had finished (marker written) are reused, not run again; the one running is
    lost and redone; every chunk is right."""
    from distributed import Client, LocalCluster

    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, counted_unit, (str(out), str(counter), i, 0.4)) for i in range(12)]
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
                    "slab", units, client=client, run_id="bkill", run_dir=run_dir, batch=6
                )
            ),
            daemon=True,
        )
        t.start()
        # the batch of units 0-5: two done, the third running
        victim = worker_running(client, "bkill", 2)
        finished = set(lat.done_markers(run_dir, "slab"))
        os.kill(pids[victim], signal.SIGKILL)
        t.join(120)
        assert not t.is_alive() and sorted(box["res"]) == list(range(12))
        u2 = client.sync(client.scheduler.emflow_unit, run_id="bkill", stage="slab", index=2)
        st = stage_snap(client, "bkill")
    assert {0, 1} <= finished
    runs = attempts(counter)
    assert all(runs[i] == 1 for i in finished), (runs, finished)  # finished: never run again
    assert runs[2] == 2  # lost with the worker, redone
    assert [h[1] for h in u2["history"]][:3] == ["queued", "running", "lost"]
    assert u2["state"] == "redone" and u2["lost"] == 1
    lost = events(run_dir, "lost")
    assert [r["index"] for r in lost] == [2]
    (done2,) = [r for r in events(run_dir, "done") if r["index"] == 2]
    assert done2["redone"] is True
    assert st["cells"][0:2] == "dd" and set(st["cells"]) <= {"d", "e"}
    assert sorted(lat.done_markers(run_dir, "slab")) == list(range(12))
    assert digest(out) == expected(12)


@pytest.mark.integration
def test_the_first_unit_of_a_batch_failing_once_runs_again_each_time(cluster, tmp_path):
    """Unit 0 fails its first attempt: its batch is submitted again with the same units
    (0-3), as a task of its own key; it must not attach to the erred task of the first
    attempt (that would count a second failure at once, without running). Five runs, since
    that race shows in some runs only."""
    for trial in range(5):
        base = tmp_path / str(trial)
        run_dir, out, counter = base / "run", base / "out", base / "count"
        out.mkdir(parents=True)
        lat.open_run(run_dir, "fp", restart=False)
        units = [
            Unit(i, counted_unit, (str(out), str(counter), i, 0.0, int(i == 0))) for i in range(8)
        ]
        res = run_stage(
            "slab", units, client=cluster, run_id=f"bfirst{trial}", run_dir=run_dir, batch=4,
            retries=1,
        )  # fmt: skip
        assert sorted(res) == list(range(8)), trial
        # the second attempt of units 0-3 ran as a task of its own key (generation 1)
        again = repr((f"emflow-slab-bfirst{trial}", (0, 1, 2, 3), 1))
        assert [res[i]["key"] for i in range(4)] == [again] * 4
        assert attempts(counter) == {**dict.fromkeys(range(8), 1), 0: 2}, trial
        failed = events(run_dir, "failed")
        assert [(r["index"], r["attempts"], r["final"]) for r in failed] == [(0, 1, False)]
        (done0,) = [r for r in events(run_dir, "done") if r["index"] == 0]
        assert done0["attempts"] == 2 and done0["redone"] is True
        assert stage_snap(cluster, f"bfirst{trial}")["cells"] == "eddddddd"
        assert sorted(lat.done_markers(run_dir, "slab")) == list(range(8))
        assert digest(out) == expected(8)


@pytest.mark.integration
def test_a_batch_whose_worker_dies_with_no_retries_fails_only_the_running_unit(tmp_path):
    """allowed-failures=0: SIGKILL the worker while unit 2 of the batch 0-5 runs -> Dask gives
    up on the task (KilledWorker, no unit index on it). With retries=0 unit 2 alone is failed
    (one attempt); units 3-5 never started: they run afterwards, once, like 6-11."""
    import dask
    from distributed import Client, LocalCluster

    run_dir, out, counter = tmp_path / "run", tmp_path / "out", tmp_path / "count"
    out.mkdir()
    lat.open_run(run_dir, "fp", restart=False)
    units = [Unit(i, counted_unit, (str(out), str(counter), i, 0.4)) for i in range(12)]
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        pids = client.run(os.getpid)
        lat.ensure_plugin(client)
        box: dict = {}

        def run() -> None:
            try:
                run_stage("slab", units, client=client, run_id="bkw", run_dir=run_dir, batch=6)
            except lat.IncompleteRun as exc:
                box["failed"] = exc.failed

        t = threading.Thread(target=run, daemon=True)
        t.start()
        os.kill(pids[worker_running(client, "bkw", 2)], signal.SIGKILL)
        t.join(120)
        assert not t.is_alive()
        st = stage_snap(client, "bkw")
    assert [(f["index"], f["attempts"]) for f in box["failed"]] == [(2, 1)]
    failed = events(run_dir, "failed")
    assert [(r["index"], r["attempts"], r["final"]) for r in failed] == [(2, 1, True)]
    assert sorted(lat.done_markers(run_dir, "slab")) == [0, 1, *range(3, 12)]
    assert attempts(counter) == dict.fromkeys(range(12), 1)  # 3-5 ran once, after the kill
    assert st["cells"] == "ddf" + "d" * 9  # the scheduler agrees: 2 failed, the rest done
    assert digest(out) == {k: v for k, v in expected(12).items() if k != "chunk002.bin"}
