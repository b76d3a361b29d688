"""The render stage deletes a decoded-slice cache entry once it is that entry's last reader.

Its page-cache pages then go straight to the slice's rendered copy (recently freed pages are
cheap to write; pages the kernel has not handed out for a while cost a fault each on a VM).
A slice another z repeats (fill_previous) keeps its entry; a unit run again after the delete
decodes the source instead and renders the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from emflow.discover import SliceRef
from emflow.io import rendercache
from emflow.io.slicecache import cache_path, store_slice
from emflow.render import SliceJob, SliceRender, render_slices

SHAPE = (96, 128)


def _stack(tmp_path: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(5)
    paths = []
    for z in range(n):
        img = rng.integers(1, 256, size=SHAPE, dtype=np.uint8)
        p = tmp_path / f"s{z:03d}.png"
        assert cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def _rendered(folder: Path, z: int) -> bytes:
    return rendercache.slice_path(folder, z).read_bytes()


def test_render_deletes_cached_slices_it_reads_last_and_renders_the_same(tmp_path):
    paths = _stack(tmp_path, 4)
    cache = tmp_path / "cache"
    for z, p in enumerate(paths):  # what the feature pass keeps (decoded, zstd-1)
        store_slice(cache, z, cv2.imread(str(p), cv2.IMREAD_UNCHANGED))
    shift = ((1.0, 0.0, 2.5), (0.0, 1.0, -1.25))
    how = SliceRender(SHAPE, SHAPE, None, "uint8", 0.02, 32, cache_dir=str(cache))
    # z 3 is missing and repeats z 2 (fill_previous): z 2's entry has two readers
    refs = [SliceRef(z, z, paths[z], None) for z in range(3)]
    refs.append(SliceRef(3, 3, paths[2], None, fill="previous"))
    source = [0, 1, 2, 2]
    jobs = [SliceJob(refs[z], shift, source[z], source.count(source[z]) == 1) for z in range(4)]

    render_slices(how, jobs, str(tmp_path / "kept"))  # the default: nothing deleted
    assert all(cache_path(cache, z).exists() for z in range(4))

    render_slices(how, jobs, str(tmp_path / "dropped"), drop_cached=True)
    assert [cache_path(cache, z).exists() for z in range(4)] == [False, False, True, True]
    for z in range(4):
        assert _rendered(tmp_path / "dropped", z) == _rendered(tmp_path / "kept", z)

    # the unit again (a retry or a resumed run): z 0 and 1 decode the PNG, same pixels
    render_slices(how, jobs, str(tmp_path / "again"), drop_cached=True)
    for z in range(4):
        assert _rendered(tmp_path / "again", z) == _rendered(tmp_path / "kept", z)
    z2, z3 = (np.frombuffer(_rendered(tmp_path / "kept", z), np.uint8) for z in (2, 3))
    assert z3.any() and (z3 == z2).all()
