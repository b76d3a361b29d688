"""Writes that reach the volume's far edge store the same bytes as tensorstore's own path.

A stack thinner than the chunk depth (or a frame that is not a whole number of chunks) cuts
chunks at the volume's edge. The writers hand those chunks to tensorstore whole -- precomputed
through a chunk no larger than the level along such an axis, OME-Zarr through an array padded
to whole chunks, the padding written as the fill value -- so tensorstore needs no element-wise
merge with a fill-value copy of each chunk. The files must be exactly those that a plain write
through the volume's own metadata produces.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from emflow.plan import make_writers, plan_output
from emflow.recipe import recipe_from_dict

OUTPUTS = [
    {"format": "precomputed", "name": "jpeg"},
    {"format": "precomputed", "name": "raw", "encoding": "raw", "sharded": False},
    {"format": "precomputed", "name": "small", "encoding": "raw", "chunk_size_xyz": [32, 16, 8]},
    {"format": "omezarr", "name": "z5"},
    {"format": "omezarr", "name": "z5s", "shard_size_xyz": [128, 128, 64]},
    {"format": "omezarr", "name": "z4", "version": "0.4"},
]


def layouts_recipe(levels: int, run: dict | None = None):
    """A recipe writing :data:`OUTPUTS` (the six layouts) of a ``x/*.png`` stack."""
    return recipe_from_dict(
        {
            "source": {"glob": "x/*.png"},
            "voxel_size_nm": [8, 8, 8],
            "output_dir": "o",
            "outputs": OUTPUTS,
            "pyramid": {"levels": levels},
            **({"run": run} if run else {}),
        }
    )


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _levels(shape_zyx: tuple[int, int, int], n: int, seed: int) -> list[np.ndarray]:
    """One array per level (content need not be a mean here: the writers store what they get)."""
    rng = np.random.default_rng(seed)
    out = []
    z, y, x = shape_zyx
    for _ in range(n):
        a = rng.integers(1, 256, size=(z, y, x), dtype=np.uint8)
        a[:, : y // 3, : x // 4] = 0  # a background corner, as warping leaves
        out.append(a)
        z, y, x = max(1, -(-z // 2)), max(1, -(-y // 2)), max(1, -(-x // 2))
    return out


@pytest.mark.parametrize("n_slices", [5, 12, 70])
def test_edge_writes_store_the_bytes_of_a_plain_tensorstore_write(tmp_path, n_slices):
    r = layouts_recipe(levels=3)
    plan = plan_output(r, n_slices, (100, 130), "uint8")
    fast = make_writers(r, plan, tmp_path / "fast", token="fast")
    plain = make_writers(r, plan, tmp_path / "plain", token="plain")
    data = _levels(plan.levels[0].shape_zyx, len(plan.levels), n_slices)
    assert [a.shape for a in data] == [lev.shape_zyx for lev in plan.levels]
    for w in fast + plain:
        w.create()
    # the path under test is taken: a precomputed chunk no deeper than a thin level
    jpeg = fast[0]._write_store(len(data) - 1).chunk_layout.read_chunk.shape
    assert jpeg[2] == min(64, plan.levels[-1].shape_zyx[0])
    for k, block in enumerate(data):
        for w in fast:  # each call covers every storage object of the level (one unit)
            w.write(k, (0, 0, 0), block).result()
        for w in plain:  # tensorstore's own path: the volume's metadata, one region write
            store = w._store(k)
            if w.name.startswith("z"):
                store.write(block).result()
            else:
                store[..., 0].write(block.transpose(2, 1, 0)).result()
    for w_fast, w_plain in zip(fast, plain, strict=True):
        got, want = _files(Path(w_fast.path)), _files(Path(w_plain.path))
        assert len(want) > len(plan.levels)
        assert got == want, w_fast.name
    # and the volumes read back as written (precomputed JPEG is lossy: raw and Zarr only)
    for w in fast:
        if w.name == "jpeg":
            continue
        for k, block in enumerate(data):
            store = w._store(k)
            back = store.read().result()
            back = back if w.name.startswith("z") else back[..., 0].transpose(2, 1, 0)
            np.testing.assert_array_equal(back, block)


def test_units_cut_in_xy_write_the_same_bytes_as_one_write(tmp_path):
    """Units owning parts of a level (some at the far edge, some inside) write what one write of
    the whole level writes."""
    r = recipe_from_dict(
        {
            "source": {"glob": "x/*.png"},
            "voxel_size_nm": [8, 8, 8],
            "output_dir": "o",
            "outputs": [OUTPUTS[1], OUTPUTS[3], OUTPUTS[5]],
            "pyramid": {"levels": 1},
        }
    )
    plan = plan_output(r, 20, (200, 330), "uint8")
    whole = make_writers(r, plan, tmp_path / "whole", token="whole")
    parts = make_writers(r, plan, tmp_path / "parts", token="parts")
    block = _levels(plan.levels[0].shape_zyx, 1, 3)[0]
    for w in whole + parts:
        w.create()
    for w in whole:
        w.write(0, (0, 0, 0), block).result()
    # 64 x 64 pieces: whole chunks of every output (unsharded precomputed, 0.4 Zarr, and the
    # 0.5 Zarr's shards are one chunk deep here); the last row and column reach the edge
    for w in parts:
        if w.name == "z5":
            continue  # its shards are the whole level (one unit): written whole above
        for y0 in range(0, 200, 64):
            for x0 in range(0, 330, 64):
                w.write(0, (0, y0, x0), block[:, y0 : y0 + 64, x0 : x0 + 64]).result()
    for a, b in zip(whole, parts, strict=True):
        if a.name == "z5":
            continue
        assert _files(Path(a.path)) == _files(Path(b.path)), a.name


def test_padded_edge_buffer_is_reused_only_once_nothing_else_holds_it():
    """The OME-Zarr edge write's padded buffer: a buffer still referenced (by a tensorstore
    write in flight) is never overwritten; a released one is reused, zero beyond the block."""
    import weakref

    from emflow.io.omezarr import _padded_buffer

    shape = (4, 5, 6)
    block = np.arange(1, 2 * 3 * 4 + 1, dtype=np.uint8).reshape(2, 3, 4)
    first = _padded_buffer(shape, block)  # still held here: as by a write in flight
    second = _padded_buffer(shape, block + 100)
    assert second is not first
    assert np.array_equal(first[:2, :3, :4], block)  # not overwritten by the second block
    assert first.sum() == block.sum()  # zero beyond the block
    released = weakref.ref(second)
    del second
    third = _padded_buffer(shape, block + 50)
    assert released() is third  # reused once released
    assert np.array_equal(third[:2, :3, :4], block + 50) and third.sum() == (block + 50).sum()
