"""The lattice without Dask: state machine, keys, markers, journal, run folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from emflow import lattice as lat
from emflow.errors import OutputError
from emflow.lattice.execute import unit_key


def test_key_round_trip_and_foreign_keys():
    assert lat.parse_key(unit_key("slab", "a03f", 7)) == ("a03f", "slab", 7)
    assert lat.parse_key(unit_key("coarse1", "run-with-dash", 0)) == ("run-with-dash", "coarse1", 0)
    # a prefix registered by the driver is exact even when the stage contains '-'
    known = {"emflow-my-stage-r1": ("r1", "my-stage")}
    assert lat.parse_key(("emflow-my-stage-r1", 3), known) == ("r1", "my-stage", 3)
    for foreign in [
        "x",
        ("inc-abc", 1),
        ("emflow-slab-r", "1"),
        ("emflow-", 1),
        ("emflow-x", 2),
        5,
    ]:
        assert lat.parse_key(foreign) is None, foreign


def test_named_transitions_and_late_duplicates():
    la = lat.Lattice()
    la.begin_stage("r", "slab", 4, skipped=[3])
    assert la.apply("r", "slab", 0, "start", worker="w1")
    assert la.apply("r", "slab", 0, "finish", worker="w1")
    assert not la.apply("r", "slab", 0, "finish")  # late duplicate: rejected
    assert not la.apply("r", "slab", 0, "start")  # a done unit is not restarted
    assert not la.apply("r", "slab", 3, "start")  # skipped stays skipped
    # a failing unit is retried: failed -> running -> done, attempts counted
    assert la.apply("r", "slab", 1, "start", worker="w1")
    assert la.apply("r", "slab", 1, "fail", error="IOError: disk")
    assert la.apply("r", "slab", 1, "start", worker="w2")
    assert la.apply("r", "slab", 1, "finish", worker="w2")
    # worker lost: running -> waiting -> running
    assert la.apply("r", "slab", 2, "start", worker="w1")
    assert la.apply("r", "slab", 2, "requeue")
    assert la.apply("r", "slab", 2, "start", worker="w2")
    assert la.apply("r", "slab", 2, "fail", error="boom")
    snap = la.snapshot()
    (run,) = snap["runs"]
    (st,) = run["stages"]
    assert st["counts"] == {
        "waiting": 0,
        "queued": 0,
        "running": 0,
        "done": 1,
        "redone": 1,  # unit 1: done at its second attempt
        "failed": 1,
        "skipped": 1,
        "orphaned": 0,
    }
    assert st["cells"] == "defs"
    assert run["rejected"] == 3
    assert [(f["index"], f["attempts"], f["error"]) for f in st["failed"]] == [(2, 2, "boom")]
    u1 = la.unit("r", "slab", 1)
    assert u1["state"] == "redone" and u1["attempts"] == 2 and u1["worker"] == "w2"
    assert [h[1] for h in u1["history"]] == ["running", "failed", "running", "redone"]


def test_orphan_and_transition_table_is_closed():
    la = lat.Lattice()
    la.begin_stage("r", "match", 3, orphaned=[1])
    assert la.snapshot()["runs"][0]["stages"][0]["cells"] == "wow"
    assert not la.apply("r", "match", 1, "start")
    for name, (sources, target) in lat.TRANSITIONS.items():
        assert target not in (lat.UnitState.SKIPPED,) or sources == {lat.UnitState.WAITING}, name
    with pytest.raises(KeyError):
        la.apply("r", "match", 0, "explode")


def test_rate_and_eta():
    la = lat.Lattice()
    la.begin_stage("r", "s", 10)
    for i in range(4):
        la.apply("r", "s", i, "start", when=100.0 + i)
        la.apply("r", "s", i, "finish", when=101.0 + i)
    st = la.run("r").stages["s"].summary(104.0, cells=False)
    assert st["rate_per_s"] == pytest.approx(1.0)
    assert st["eta_s"] == pytest.approx(6.0)
    assert "cells" not in st


def test_marker_is_atomic_and_listed(tmp_path):
    path = lat.marker_path(tmp_path, "slab", 12)
    lat.write_marker(path, {"result": {"n": 1}, "worker": "w"})
    assert lat.read_marker(path)["result"] == {"n": 1}
    # leftovers of a crash mid-write: a temp file and a torn marker are not 'done'
    (path.parent / ".13.json.deadbeef.tmp").write_text('{"result": 1}')
    (path.parent / "14.json").write_text('{"result": ')
    assert set(lat.done_markers(tmp_path, "slab")) == {12}
    assert lat.done_markers(tmp_path, "nope") == {}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".12.json")]


def test_journal_tolerates_a_torn_last_line_and_replays(tmp_path):
    with lat.Journal(tmp_path) as j:
        j.append("session", session="s1")
        j.append("stage", session="s1", stage="slab", run_id="r", total=3)
        j.append("skipped", session="s1", stage="slab", indices=[0])
        j.append("done", session="s1", stage="slab", index=1, start=1.0, end=2.0, worker="w")
        j.append(
            "failed", session="s1", stage="slab", index=2, attempts=3, error="boom", final=True
        )
    with open(tmp_path / lat.JOURNAL, "a") as fh:
        fh.write('{"event": "done", "sta')  # driver killed mid-line
    recs = list(lat.read_journal(tmp_path))
    assert [r["event"] for r in recs] == ["session", "stage", "skipped", "done", "failed"]
    snap = lat.summarize_journal(tmp_path)
    st = snap["runs"][0]["stages"][0]
    assert snap["runs"][0]["run_id"] == "r"
    assert st["cells"] == "sdf" and st["failed"][0]["attempts"] == 3
    assert lat.journal_done(tmp_path) == {("slab", 1)}


def test_open_run_resume_refuse_restart(tmp_path):
    run_dir = tmp_path / "out" / "emflow-run"
    assert lat.open_run(run_dir, "fp1", restart=False) is False
    lat.write_marker(lat.marker_path(run_dir, "slab", 0), {"result": {}})
    assert lat.open_run(run_dir, "fp1", restart=False) is True
    with pytest.raises(OutputError) as e:
        lat.open_run(run_dir, "fp2", restart=False)
    msg = str(e.value)
    assert str(run_dir) in msg and "use --restart" in msg and "\n" not in msg
    # restart forgets every marker and the journal
    assert lat.open_run(run_dir, "fp2", restart=True) is False
    assert lat.done_markers(run_dir, "slab") == {}
    sessions = [r for r in lat.read_journal(run_dir) if r["event"] == "session"]
    assert len(sessions) == 1 and sessions[0]["resumed"] is False
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == "fp2"


def test_session_reconciles_markers_missing_from_the_journal(tmp_path):
    lat.open_run(tmp_path, "fp", restart=False)
    for i in range(3):  # units finished by workers after the driver died: markers, no journal line
        lat.write_marker(lat.marker_path(tmp_path, "slab", i), {"result": i, "worker": "w"})
    assert lat.journal_done(tmp_path) == set()
    lat.open_run(tmp_path, "fp", restart=False)
    assert lat.journal_done(tmp_path) == {("slab", 0), ("slab", 1), ("slab", 2)}
    rec = [r for r in lat.read_journal(tmp_path) if r["event"] == "done"]
    assert all(r["recovered"] for r in rec)
    assert os.path.exists(tmp_path / lat.JOURNAL)


def test_incomplete_run_message_lists_failures():
    failed = [{"stage": "slab", "index": i, "attempts": 3, "error": f"E{i}"} for i in range(7)]
    exc = lat.IncompleteRun.from_failures(failed, None)
    assert exc.exit_code == 3 and exc.failed == failed
    assert "7 unit(s) failed" in str(exc) and "slab[0]" in str(exc) and "and 2 more" in str(exc)
    assert issubclass(lat.RunCancelled, lat.IncompleteRun)


def test_plugin_pause_resume_cancel_per_run_and_stage():
    """The RPC handlers' logic, without a scheduler: a paused stage only pauses that stage,
    and a new driver session of the same run clears pause and cancel."""
    p = lat.LatticePlugin()
    p.begin_stage("r", "slab", 3, prefix="emflow-slab-r", session="s1")
    p.begin_stage("q", "slab", 3, prefix="emflow-slab-q", session="t1")
    assert p.control("r", "slab") == {"paused": False, "cancelled": False}
    p.pause("r", stage="coarse1")
    assert not p.control("r", "slab")["paused"] and p.control("r", "coarse1")["paused"]
    p.pause("r")
    assert p.control("r", "slab")["paused"] and not p.control("q", "slab")["paused"]
    p.resume("r", stage="coarse1")
    assert p.control("r", "slab")["paused"]  # the whole run is still paused
    p.resume("r")
    assert not p.control("r", "coarse1")["paused"]
    p.cancel("r")
    assert p.control("r", "slab")["cancelled"] and not p.control("q", "slab")["cancelled"]
    p.begin_stage("r", "slab", 3, prefix="emflow-slab-r", session="s2")  # `emflow run` again
    assert p.control("r", "slab") == {"paused": False, "cancelled": False}
    assert p.control("unknown") == {"paused": False, "cancelled": False}
    # scheduler transitions of emflow keys, foreign keys ignored
    p.transition(("emflow-slab-r", 1), "waiting", "processing")
    p.transition(("emflow-slab-r", 1), "processing", "memory", worker="tcp://w:1")
    p.transition(("other", 1), "waiting", "processing")
    p.transition(("emflow-slab-r", 1), "processing", "memory", worker="tcp://w:1")  # duplicate
    assert p.unit("r", "slab", 1)["state"] == "done"
    assert p.snapshot("r")["runs"][0]["rejected"] == 1


def test_large_lattice_is_cheap():
    """100,000 units: one byte of state each, snapshot and counts over the byte string."""
    la = lat.Lattice()
    la.begin_stage("big", "slab", 100_000, skipped=range(0, 100_000, 2))
    for i in range(1, 2001, 2):
        la.apply("big", "slab", i, "start", worker="w")
        la.apply("big", "slab", i, "finish", worker="w")
    st = la.snapshot("big")["runs"][0]["stages"][0]
    assert st["counts"]["skipped"] == 50_000 and st["counts"]["done"] == 1000
    assert len(st["cells"]) == 100_000 and len(la.run("big").stages["slab"].cells) == 1000


def test_eta_stays_put_while_paused():
    """Paused time does not count: the rate (and so the ETA) at the pause holds while paused."""
    la = lat.Lattice()
    la.begin_stage("r", "s", 10)
    for i in range(4):
        la.apply("r", "s", i, "start", when=100.0 + i)
        la.apply("r", "s", i, "finish", when=101.0 + i)
    run = la.run("r")
    run.set_paused(True, now=104.0)
    at_pause = la.snapshot(now=104.0)["runs"][0]["stages"][0]
    later = la.snapshot(now=500.0)["runs"][0]["stages"][0]
    assert at_pause["eta_s"] == later["eta_s"] == pytest.approx(6.0)
    run.set_paused(False, now=500.0)
    la.apply("r", "s", 4, "start", when=500.0)
    la.apply("r", "s", 4, "finish", when=501.0)
    st = la.snapshot(now=501.0)["runs"][0]["stages"][0]
    assert st["elapsed_s"] == pytest.approx(5.0)  # 100..104 and 500..501
    assert st["rate_per_s"] == pytest.approx(1.0) and st["eta_s"] == pytest.approx(5.0)
    # a pause of another stage does not hold this one
    run.set_paused(True, "other", now=501.0)
    assert la.snapshot(now=600.0)["runs"][0]["stages"][0]["eta_s"] > 5.0  # this one runs on


def test_queued_units_and_lost_attempts():
    la = lat.Lattice()
    la.begin_stage("r", "slab", 3)
    assert la.apply("r", "slab", 0, "queue", worker="w1")
    assert la.apply("r", "slab", 0, "start", worker="w1")
    la.lose("r", "slab", 0, worker="w1")  # the worker died running it
    assert la.apply("r", "slab", 0, "queue", worker="w2")
    assert la.apply("r", "slab", 0, "start", worker="w2")
    assert la.apply("r", "slab", 0, "finish", worker="w2")
    assert la.apply("r", "slab", 1, "queue", worker="w1")
    assert la.apply("r", "slab", 1, "requeue")  # paused while queued: not an attempt
    st = la.snapshot()["runs"][0]["stages"][0]
    assert st["cells"] == "eww" and st["lost"] == 1
    u0 = la.unit("r", "slab", 0)
    assert u0["attempts"] == 2 and u0["lost"] == 1
    assert [h[1] for h in u0["history"]] == [
        "queued", "running", "lost", "queued", "running", "redone"
    ]  # fmt: skip
    assert u0["history"][2][2] == "w1"
    assert la.unit("r", "slab", 1)["attempts"] == 0
    # a unit an earlier driver had started is lost with it, and redone
    la.begin_stage("r", "slab", 3, skipped=[0], redo=[2])
    la.apply("r", "slab", 2, "start", worker="w3")
    la.apply("r", "slab", 2, "finish", worker="w3")
    assert la.snapshot()["runs"][0]["stages"][0]["cells"] == "swe"


def test_plan_announces_every_stage_and_keeps_begun_ones():
    la = lat.Lattice()
    la.plan(
        "r",
        [
            {"stage": "features", "total": 4},
            {"stage": "slab", "total": 2, "labels": ["z 0-7", "z 8-15"]},
        ],
    )
    la.begin_stage("r", "features", 4)
    la.apply("r", "features", 0, "start")
    la.apply("r", "features", 0, "finish")
    la.plan(
        "r",
        [
            {"stage": "features", "total": 4},
            {"stage": "slab", "total": 3, "labels": ["z 0-3", "z 4-7", "z 8-9"]},
        ],
    )
    stages = la.snapshot()["runs"][0]["stages"]
    assert [(s["stage"], s["total"], s["planned"]) for s in stages] == [
        ("features", 4, False), ("slab", 3, True)
    ]  # fmt: skip
    assert stages[0]["cells"] == "dwww" and stages[1]["labels"][2] == "z 8-9"
    la.begin_stage("r", "slab", 3)  # labels kept from the plan
    assert la.unit("r", "slab", 1)["label"] == "z 4-7"


def test_journal_replay_tells_starts_losses_and_redos(tmp_path):
    """A session that died with units in flight: the next session records them lost with the
    dead driver and redoes them; the replay (what `emflow status` shows) counts it all."""
    lat.open_run(tmp_path, "fp", restart=False)
    with lat.Journal(tmp_path) as j:
        j.append("plan", stages=[{"stage": "slab", "total": 4}, {"stage": "coarse1", "total": 1}])
        j.append("stage", stage="slab", run_id="fp", total=4)
        for i in range(3):
            j.append("start", stage="slab", index=i, worker=f"w{i}", attempt=1)
        j.append("lost", stage="slab", index=1, worker="w1", reason="worker lost")
        j.append("start", stage="slab", index=1, worker="w0", attempt=2)
        j.append("done", stage="slab", index=1, attempts=2, redone=True, worker="w0")
        j.append("done", stage="slab", index=0, attempts=1, worker="w0")
    lat.write_marker(lat.marker_path(tmp_path, "slab", 0), {"result": {}})
    lat.write_marker(lat.marker_path(tmp_path, "slab", 1), {"result": {}})
    live = lat.summarize_journal(tmp_path)["runs"][0]["stages"]
    assert [(s["stage"], s["cells"]) for s in live] == [("slab", "derw"), ("coarse1", "w")]
    dead = lat.summarize_journal(tmp_path, stopped=True)["runs"][0]["stages"][0]
    assert dead["cells"] == "deww" and dead["lost"] == 2  # unit 2 was lost with the driver
    # the next session: unit 2 (started, no marker) is lost with the dead driver, then redone
    lat.open_run(tmp_path, "fp", restart=False)
    assert lat.earlier_attempts(tmp_path, "slab") == {2}
    lost = [r for r in lat.read_journal(tmp_path) if r["event"] == "lost"]
    assert lost[-1] == {**lost[-1], "index": 2, "worker": "w2", "reason": "driver stopped"}
    with lat.Journal(tmp_path) as j:
        j.append("stage", stage="slab", run_id="fp", total=4, redo=[2])
        j.append("skipped", stage="slab", indices=[0, 1])
        j.append("start", stage="slab", index=2, worker="w5", attempt=1)
        j.append("done", stage="slab", index=2, attempts=1, redone=True, worker="w5")
    st = lat.summarize_journal(tmp_path)["runs"][0]["stages"][0]
    assert st["cells"] == "ssew" and st["lost"] == 1 and st["counts"]["redone"] == 1


def test_secrets_folder_is_private_and_a_dead_drivers_files_go(tmp_path):
    from emflow.cluster import secrets

    folder = secrets.prepare(tmp_path / "secrets")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    pem = secrets.write_pem(folder, "client-key.pem", "-----BEGIN PRIVATE KEY-----\nx\n")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    outside = tmp_path / "site-shared" / ".dask-jobqueue.worker.key.abc"
    outside.parent.mkdir()
    outside.write_text("k")
    secrets.register(folder, [outside])
    # another driver starts while this one lives: nothing is removed, nothing claimed
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from emflow.cluster import secrets; "
         "secrets.prepare(sys.argv[1])", str(folder)], check=True,
    )  # fmt: skip
    assert other.returncode == 0 and pem.exists() and outside.exists()
    assert secrets.owner(folder)["pid"] == os.getpid()
    # this driver "dies": its claim names a process that no longer runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = secrets.owner(folder)
    (folder / secrets.OWNER).write_text(json.dumps({**rec, "pid": dead.pid}))
    secrets.prepare(folder)  # the next driver
    assert not pem.exists() and not outside.exists()
    assert secrets.owner(folder)["pid"] == os.getpid()
    secrets.write_pem(folder, "client-ca.pem", "ca")
    secrets.release(folder, ["client-ca.pem"])
    assert list(folder.iterdir()) == []
