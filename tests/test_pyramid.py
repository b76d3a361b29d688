"""Mean downsampling and level planning against exact float references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emflow.geometry import cut_slabs, shard_layout
from emflow.pyramid import downsample_levels, next_step, plan_levels, steps_between


def _float_mean(v: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Exact mean over (possibly partial) f-blocks, rounded half to even."""
    shape = tuple(-(-s // k) for s, k in zip(v.shape, f, strict=True))
    out = np.zeros(shape)
    for z in range(shape[0]):
        for y in range(shape[1]):
            for x in range(shape[2]):
                out[z, y, x] = v[
                    z * f[0] : (z + 1) * f[0], y * f[1] : (y + 1) * f[1], x * f[2] : (x + 1) * f[2]
                ].mean()
    return np.round(out)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_every_level_is_the_rounded_exact_mean_of_level_0(dtype):
    rng = np.random.default_rng(0)
    v = rng.integers(0, np.iinfo(dtype).max + 1, size=(5, 13, 11), dtype=dtype)
    steps = [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    levels = downsample_levels(v, steps)
    factor = (1, 1, 1)
    for step, got in zip(steps, levels, strict=True):
        factor = tuple(a * b for a, b in zip(factor, step, strict=True))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, _float_mean(v.astype(np.float64), factor))


def test_mean_bias_is_negligible_at_every_level():
    """Rounding once, half to even: |bias| ≤ 0.1 grey value (truncation darkens by ~0.4/level)."""
    rng = np.random.default_rng(1)
    v = rng.integers(0, 256, size=(32, 256, 256), dtype=np.uint8)
    for k, lev in enumerate(downsample_levels(v, [(2, 2, 2)] * 4)):
        f = 2 ** (k + 1)
        exact = v.reshape(32 // f, f, 256 // f, f, 256 // f, f).mean(axis=(1, 3, 5))
        assert abs(lev.mean() - exact.mean()) <= 0.1
        assert np.abs(lev - exact).max() <= 0.5


def test_slab_pyramid_equals_whole_pyramid():
    """Chunked equals whole: slabs of 4 z (aligned) give the same levels as the whole volume."""
    rng = np.random.default_rng(2)
    v = rng.integers(0, 256, size=(13, 21, 17), dtype=np.uint8)
    steps = [(1, 2, 2), (2, 2, 2)]
    whole = downsample_levels(v, steps)
    parts = [downsample_levels(v[z0:z1], steps) for z0, z1 in cut_slabs(13, 4)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_levels_downsample_fine_axes_until_near_isotropic():
    assert next_step((40, 4, 4)) == (1, 2, 2)
    assert next_step((40, 32, 32)) == (2, 2, 2)
    levels = plan_levels((37, 777, 1000), (4, 4, 40), (64, 64, 64))
    assert [lev.factor_zyx for lev in levels] == [
        (1, 1, 1),
        (1, 2, 2),
        (1, 4, 4),
        (1, 8, 8),
        (2, 16, 16),
    ]
    assert levels[-1].shape_zyx == (19, 49, 63)
    assert all(s <= 64 for s in levels[-1].shape_zyx)
    assert [lev.factor_zyx for lev in plan_levels((64, 64, 64), (8, 8, 8), (64, 64, 64), 3)] == [
        (1, 1, 1),
        (2, 2, 2),
        (4, 4, 4),
    ]
    assert steps_between(levels, 1, 4) == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), depth=st.integers(1, 64))
def test_slabs_cover_the_stack_exactly_once(n, depth):
    slabs = cut_slabs(n, depth)
    covered = [z for z0, z1 in slabs for z in range(z0, z1)]
    assert covered == list(range(n))
    assert all(z0 % depth == 0 for z0, _ in slabs)


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 3000)),
    max_z=st.sampled_from([None, 1, 2, 4, 8]),
)
def test_shard_layout_is_a_box_and_respects_the_z_limit(size, max_z):
    lay = shard_layout(size, (64, 64, 64), max_chunks=4096, max_z_chunks=max_z)
    n = lay.shard_chunks_xyz[0] * lay.shard_chunks_xyz[1] * lay.shard_chunks_xyz[2]
    assert n == 2 ** (lay.preshift_bits + lay.minishard_bits) <= 4096
    if max_z is not None:
        assert lay.shard_chunks_xyz[2] <= max_z


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_cube_sums_equal_pair_sums_along_each_axis(dtype):
    """The plane-by-plane 2x2x2 step (even blocks, also strided y-band views) gives the same
    integers as summing pairs along z, y and x over the whole block."""
    from emflow.pyramid import _sum_cubes, _sum_pairs

    rng = np.random.default_rng(7)
    top = np.iinfo(dtype).max
    block = rng.integers(0, top + 1, (18, 40, 26), dtype=dtype)
    wide = np.uint16 if dtype == np.uint8 else np.uint32
    for a in (block, block[:, 8:32], block[2:12, :, 4:20]):
        want = a
        for axis in range(3):
            want = _sum_pairs(want, axis, np.dtype(wide))
        for planes in (1, 2, 4, 100):
            got = _sum_cubes(a, np.dtype(wide), planes=planes)
            assert got is not None and got.dtype == wide
            np.testing.assert_array_equal(got, want)
    assert _sum_cubes(block[:, :, :25], np.dtype(wide)) is None  # odd x: the per-axis path
