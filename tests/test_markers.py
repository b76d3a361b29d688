"""Done markers are cheap (not fsynced) and safe: a lost, empty or torn marker reads as
absent, so its unit runs again and the run ends with the same results."""

from __future__ import annotations

import json
import os

from emflow import lattice as lat
from emflow.lattice.execute import Unit, run_stage

PAYLOAD = {"result": {"box": [0, 64, 0, 512, 0, 512], "n": 7}, "worker": "tcp://w:1", "start": 1.5}


def test_done_marker_written_in_place_reads_back_whole(tmp_path):
    fast = lat.marker_path(tmp_path, "slab", 3)
    slow = lat.marker_path(tmp_path, "slab", 4)
    lat.write_marker(fast, PAYLOAD, durable=False)  # also makes done/slab/
    lat.write_marker(slow, PAYLOAD)
    assert lat.read_marker(fast) == PAYLOAD == lat.read_marker(slow)
    assert (
        fast.read_bytes()
        == slow.read_bytes()
        == json.dumps(PAYLOAD, separators=(",", ":")).encode()
    )
    lat.write_marker(fast, {"result": 2}, durable=False)  # replaced whole
    assert lat.read_marker(fast) == {"result": 2}
    assert sorted(p.name for p in fast.parent.iterdir()) == ["3.json", "4.json"]
    lat.sync_markers(tmp_path, "slab")
    lat.sync_markers(tmp_path, "no-such-stage")  # nothing to sync: no error


def test_empty_torn_or_foreign_markers_read_as_absent(tmp_path):
    folder = lat.marker_path(tmp_path, "render", 0).parent
    folder.mkdir(parents=True)
    text = json.dumps(PAYLOAD, separators=(",", ":"))
    # every strict prefix of a marker (a power loss can leave any of them, or nothing)
    for n in range(len(text)):
        path = folder / f"{n}.json"
        path.write_text(text[:n])
        assert lat.read_marker(path) is None, text[:n]
    bad = {
        1000: b"\x00" * 64,  # zero-filled blocks after a crash
        1001: b"\xff\xfe garbage",  # not UTF-8
        1002: b'["result", 1]',  # JSON but not a marker
        1003: b'{"worker": "w"}',  # no result
        1004: b"null",
    }
    for i, data in bad.items():
        (folder / f"{i}.json").write_bytes(data)
        assert lat.read_marker(folder / f"{i}.json") is None
    (folder / f"{len(text)}.json").write_text(text)  # the one whole marker
    assert list(lat.done_markers(tmp_path, "render")) == [len(text)]
    assert lat.done_markers(tmp_path, "render")[len(text)] == PAYLOAD


def _unit_writes(folder: str, i: int) -> dict:
    """A unit: its output is a file; it counts its own runs in a log."""
    with open(os.path.join(folder, "runs.log"), "a") as fh:
        fh.write(f"{i}\n")
    with open(os.path.join(folder, f"out{i}.bin"), "wb") as fh:
        fh.write(bytes([i]) * 100)
    return {"index": i, "sum": 100 * i}


def test_a_lost_or_empty_marker_makes_only_its_unit_run_again(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    units = [Unit(i, _unit_writes, (str(data), i)) for i in range(6)]
    first = run_stage("slab", units, run_dir=run_dir, run_id="r")
    assert first == {i: {"index": i, "sum": 100 * i} for i in range(6)}
    assert (data / "runs.log").read_text().split() == [str(i) for i in range(6)]
    lat.marker_path(run_dir, "slab", 1).unlink()  # lost
    lat.marker_path(run_dir, "slab", 4).write_bytes(b"")  # emptied by a power loss
    lat.marker_path(run_dir, "slab", 5).write_text('{"result": {"ind')  # torn
    again = run_stage("slab", units, run_dir=run_dir, run_id="r")
    assert again == first
    runs = (data / "runs.log").read_text().split()
    assert runs[6:] == ["1", "4", "5"]
    assert sorted(lat.done_markers(run_dir, "slab")) == list(range(6))
    assert all((data / f"out{i}.bin").read_bytes() == bytes([i]) * 100 for i in range(6))
    # a third run finds every unit done: nothing runs
    assert run_stage("slab", units, run_dir=run_dir, run_id="r") == first
    assert len((data / "runs.log").read_text().split()) == 9


def test_reserved_markers_read_as_absent_until_written_and_keep_a_written_one(tmp_path):
    """The driver reserves a batch's markers (empty files) so that workers write into files
    that exist: a reserved marker is not done; reserving never empties a written marker."""
    paths = [str(lat.marker_path(tmp_path, "features", i)) for i in range(4)]
    lat.write_marker(lat.marker_path(tmp_path, "features", 2), PAYLOAD, durable=False)
    lat.reserve_markers(paths)  # also makes done/features/ (it exists here already)
    size = len(json.dumps(PAYLOAD, separators=(",", ":")))
    assert [os.path.getsize(p) for p in paths] == [0, 0, size, 0]
    assert [lat.read_marker(p) for p in paths] == [None, None, PAYLOAD, None]
    assert list(lat.done_markers(tmp_path, "features")) == [2]
    lat.write_marker(lat.marker_path(tmp_path, "features", 0), {"result": 0}, durable=False)
    assert lat.done_markers(tmp_path, "features") == {0: {"result": 0}, 2: PAYLOAD}
    lat.reserve_markers([str(lat.marker_path(tmp_path / "fresh", "slab", 7))])  # makes the folder
    assert lat.marker_path(tmp_path / "fresh", "slab", 7).read_bytes() == b""
