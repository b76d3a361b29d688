"""Written output files leave the page cache once durable (emflow.io.pagecache).

A writer's future drops the pages of the files a block is stored in once the write completed;
the names it computes (shards, chunks) must be exactly the files tensorstore wrote, for every
format, thin and thick stacks, units cut in x/y and at the volume's edge.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from emflow.io import pagecache
from emflow.plan import make_writers, plan_output
from tests.test_edge_chunks import layouts_recipe  # the same six layouts


def _data_files(root: Path) -> set[Path]:
    meta = {"info", "zarr.json", ".zarray", ".zgroup", ".zattrs"}
    return {p for p in root.rglob("*") if p.is_file() and p.name not in meta}


def _boxes(shape, cell):
    ranges = [range(0, n, n if c is None else c) for n, c in zip(shape, cell, strict=True)]
    for o in itertools.product(*ranges):
        size = tuple(
            min(n if c is None else c, n - a) for a, n, c in zip(o, shape, cell, strict=True)
        )
        yield o, size


@pytest.mark.parametrize(("n_slices", "frame"), [(5, (100, 130)), (40, (600, 520)), (70, (96, 64))])
def test_files_named_are_the_files_written(tmp_path, n_slices, frame, monkeypatch):
    r = layouts_recipe(levels=4, run={"memory_per_worker": "0.6GiB", "threads_per_worker": 1})
    plan = plan_output(r, n_slices, frame, "uint8")
    assert (plan.cells[0] != (None, None, None)) == (frame[0] > 512)  # units cut in x/y too
    dropped: list[Path] = []
    monkeypatch.setattr(pagecache, "drop", lambda paths: dropped.extend(map(Path, paths)))
    writers = make_writers(r, plan, tmp_path, token="t")
    rng = np.random.default_rng(n_slices)
    for w in writers:
        w.create()
        root = Path(w.path)
        every: set[Path] = set()
        for lev, cell in zip(plan.levels, plan.cells, strict=True):
            for origin, size in _boxes(lev.shape_zyx, cell):
                block = rng.integers(0, 256, size=size, dtype=np.uint8)
                block[:, : size[1] // 2] = 0  # background: some Zarr chunks stay unwritten
                before = _data_files(root)
                dropped.clear()
                w.write(lev.index, origin, block).result()
                after = _data_files(root)
                named = set(w.files(lev.index, origin, size))
                assert after - before <= named, (w.name, lev.index, origin)
                every |= named
                assert set(dropped) == named  # dropped once the write is done
        # every file is named by the unit that wrote it (a chunk of fill values is not written)
        assert _data_files(root) and _data_files(root) <= every, w.name


def test_drop_skips_missing_files_and_waits_for_the_write(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"x" * 10000)
    pagecache.drop([f, tmp_path / "missing"])  # no error
    assert f.read_bytes() == b"x" * 10000

    calls = []

    class Future:
        def result(self):
            calls.append("result")
            return 7

    def paths():
        calls.append("paths")
        return [f]

    fut = pagecache.DropWhenDone(Future(), paths)
    assert calls == []
    assert fut.result() == 7
    assert calls == ["result", "paths"]
    fut.result()  # the paths are asked once
    assert calls == ["result", "paths", "result"]
