"""Every level is the exact mean of the level-0 voxels it covers, rounded half to even once,
whatever the plan: random shapes, chunk sizes, slab depths, budgets (hence brick sizes and pass
counts), anisotropic and isotropic voxels, 8 and 16 bit. The plan's real units run (pass 0 from
a rendered level-0 copy, later passes from the hand-off sums) into in-memory outputs that also
check that no voxel is written twice; each level is compared with a float64 reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emflow.io import rendercache
from emflow.plan import WORKER_BASE, plan_output
from emflow.recipe import recipe_from_dict
from emflow.render import BrickJob, SliceRender, build_brick


class _Done:
    def result(self) -> None:
        return None


class MemoryVolume:
    """One output (or hand-off) held in numpy arrays: the Writer protocol, plus a write count."""

    def __init__(self, name: str, shapes, dtype) -> None:
        self.name = name
        self.arrays = [np.zeros(s, dtype) for s in shapes]
        self.hits = [np.zeros(s, np.uint8) for s in shapes]

    def write(self, level, origin, block):
        z0, y0, x0 = origin
        sl = np.s_[z0 : z0 + block.shape[0], y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]]
        self.arrays[level][sl] = block
        self.hits[level][sl] += 1
        return _Done()


class MemoryHandoff(MemoryVolume):
    """A hand-off array in memory: ``write(origin, block)`` and ``read(box)``."""

    def write(self, origin, block):  # type: ignore[override]
        return super().write(0, origin, block)

    def read(self, box):
        z0, z1, y0, y1, x0, x1 = box
        return self.arrays[0][z0:z1, y0:y1, x0:x1].copy()


def reference(volume: np.ndarray, factor) -> np.ndarray:
    """float64 mean over each (partial at the far edges) factor block, rounded half to even."""
    sums = volume.astype(np.float64)
    counts = []
    for axis, f in enumerate(factor):
        n = sums.shape[axis]
        sums = np.add.reduceat(sums, np.arange(0, n, f), axis=axis)
        counts.append(np.minimum(f, n - np.arange(0, n, f)).astype(np.float64))
    cz, cy, cx = counts
    return np.round(sums / (cz[:, None, None] * cy[None, :, None] * cx[None, None, :]))


def run_plan(volume: np.ndarray, recipe, budget: int, tmp: Path, brick_xy_px: int = 1024):
    nz, ny, nx = volume.shape
    dtype = volume.dtype.name
    plan = plan_output(recipe, nz, (ny, nx), dtype, budget=budget, brick_xy_px=brick_xy_px)
    folder = tmp / f"rendered-{np.random.default_rng().integers(1 << 30)}"
    for z in range(nz):
        rendercache.store_slice(folder, z, volume[z])
    out = MemoryVolume("out", [lev.shape_zyx for lev in plan.levels], volume.dtype)
    how = SliceRender((ny, nx), (ny, nx), None, plan.out_dtype, 0.0, 64, dtype)
    handoffs = {}
    for p in plan.passes:
        if p.handoff is not None:
            shape = plan.levels[p.handoff].shape_zyx
            handoffs[p.handoff] = MemoryHandoff(
                f"h{p.handoff}", [shape], plan.handoff_dtype(p.handoff)
            )
    for p in plan.passes:
        for i in range(p.n_units):
            job = BrickJob(
                index=i,
                box=p.box(i),
                source=p.source,
                last=p.last,
                handoff_level=p.handoff,
                levels=plan.levels,
                writers=(out,),
                out_dtype=plan.out_dtype,
                handoff=handoffs.get(p.handoff),
                source_array=handoffs.get(p.source) if p.index else None,
                how=how if p.index == 0 else None,
                render_dir=str(folder) if p.index == 0 else None,
                threads=2,
            )
            build_brick(job)
    return plan, out, handoffs


def _recipe(vs, chunk, slab_depth, zarr_shard=None):
    outputs = [{"format": "precomputed", "encoding": "raw", "chunk_size_xyz": chunk}]
    z = {"format": "omezarr", "chunk_size_xyz": chunk}
    if zarr_shard is not None:
        z["shard_size_xyz"] = zarr_shard
    outputs.append(z)
    run = {"slab_depth": slab_depth} if slab_depth else {}
    return recipe_from_dict(
        {"source": {"glob": "x/*.png"}, "voxel_size_nm": vs, "output_dir": "o",
         "outputs": outputs, "run": run, "enhance": {"clip_limit": 0}}
    )  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(1, 70)),
    chunk=st.tuples(
        st.sampled_from([2, 4, 8]), st.sampled_from([4, 8]), st.sampled_from([2, 4, 8])
    ),
    vs=st.sampled_from([(4, 4, 40), (8, 8, 8), (4, 4, 12)]),
    depth_chunks=st.sampled_from([None, 1, 2, 3]),
    extra=st.integers(0, 200_000),
    xy_px=st.sampled_from([8, 16, 1024]),
    bits16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_level_is_the_rounded_exact_mean_of_level_0(
    shape, chunk, vs, depth_chunks, extra, xy_px, bits16, seed, tmp_path
):
    dtype = np.uint16 if bits16 else np.uint8
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    # the odd extreme values make rounding ties and sum overflows likely
    volume[rng.random(shape) < 0.1] = np.iinfo(dtype).max
    cx, cy, cz = (chunk[2], chunk[1], chunk[0])
    depth = depth_chunks * cz if depth_chunks else None
    recipe = _recipe(vs, [cx, cy, cz], depth)
    if bits16:
        recipe = recipe.model_copy(
            update={"depth": recipe.depth.model_copy(update={"output": "uint16"})}
        )
    # a budget just above an idle worker's: tiny bricks, several passes
    plan, out, handoffs = run_plan(volume, recipe, WORKER_BASE + 65536 + extra, tmp_path, xy_px)
    assert plan.out_dtype == np.dtype(dtype).name
    for k, lev in enumerate(plan.levels):
        assert (out.hits[k] == 1).all(), f"level {k}: voxels written {out.hits[k].max()} times"
        want = reference(volume, lev.factor_zyx)
        np.testing.assert_array_equal(out.arrays[k], want.astype(dtype), err_msg=f"level {k}")
    for h, arr in handoffs.items():  # each hand-off voxel written exactly once, exact sums
        assert (arr.hits[0] == 1).all(), h


def test_many_passes_are_exercised(tmp_path):
    """The property test's budgets do produce several passes and cut bricks in x, y and z."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=(37, 70, 61), dtype=np.uint8)
    recipe = _recipe((8, 8, 8), [2, 2, 2], 8)  # slabs of 8 z, bricks of 8 px in x and y
    plan, out, _ = run_plan(volume, recipe, WORKER_BASE + 100_000, tmp_path, brick_xy_px=8)
    assert len(plan.passes) >= 3
    assert all(g > 1 for g in plan.passes[0].grid_zyx)
    assert any(g > 1 for g in plan.passes[1].grid_zyx)
    for k, lev in enumerate(plan.levels):
        np.testing.assert_array_equal(out.arrays[k], reference(volume, lev.factor_zyx))


@pytest.mark.parametrize("shard", [[16, 16, 8], [8, 32, 4]])
def test_given_zarr_shards_are_owned_whole(shard, tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, size=(21, 50, 45), dtype=np.uint8)
    recipe = _recipe((4, 4, 40), [4, 4, 4], None, zarr_shard=shard)
    plan, out, _ = run_plan(volume, recipe, WORKER_BASE + 30_000, tmp_path)
    for k, lev in enumerate(plan.levels):
        np.testing.assert_array_equal(out.arrays[k], reference(volume, lev.factor_zyx))
    sx, sy, sz = shard
    for k, cell in enumerate(plan.cells):
        for c, s, n in zip(cell, (sz, sy, sx), plan.levels[k].shape_zyx, strict=True):
            # a given shard shrinks to the level (rounded up to the chunk) where it is larger
            assert c is None or c % min(s, math.ceil(n / 4) * 4) == 0, (k, cell)
