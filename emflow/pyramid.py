"""Pyramid planning and mean downsampling with correct rounding.

Levels are derived by downsampling by 2 along the axes that are finer than the
coarsest one by more than √2 (serial sections: x and y first), then along all
three once near-isotropic. Means are computed from integer block sums and
rounded half to even once per level; partial blocks at the volume's far edges
average only the voxels that exist (as neuroglancer and tinybrain do).
Arrays are (z, y, x); factors are (fz, fy, fx) relative to level 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Level:
    """One pyramid level: cumulative downsampling factor, shape and voxel size."""

    index: int
    factor_zyx: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]
    voxel_size_nm_zyx: tuple[float, float, float]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def next_step(voxel_size_zyx: Sequence[float]) -> tuple[int, int, int]:
    """Per-axis factor (1 or 2) of the next level: the fine axes, or all three when near-isotropic."""
    coarsest = max(voxel_size_zyx)
    fine = tuple(2 if v * math.sqrt(2) < coarsest else 1 for v in voxel_size_zyx)
    return fine if any(f == 2 for f in fine) else (2, 2, 2)


def plan_levels(
    shape_zyx: Sequence[int],
    voxel_size_nm_xyz: Sequence[float],
    chunk_zyx: Sequence[int],
    levels: int | None = None,
) -> list[Level]:
    """Plan the pyramid: ``levels`` levels, or until the coarsest fits in one chunk."""
    vs = (float(voxel_size_nm_xyz[2]), float(voxel_size_nm_xyz[1]), float(voxel_size_nm_xyz[0]))
    shape = tuple(int(s) for s in shape_zyx)
    factor = (1, 1, 1)
    out = [Level(0, factor, shape, vs)]  # type: ignore[arg-type]
    while True:
        last = out[-1]
        if levels is not None and len(out) >= levels:
            break
        if levels is None and all(s <= c for s, c in zip(last.shape_zyx, chunk_zyx, strict=True)):
            break
        if all(s == 1 for s in last.shape_zyx):
            break
        step = next_step(last.voxel_size_nm_zyx)
        factor = tuple(f * s for f, s in zip(last.factor_zyx, step, strict=True))
        shape = tuple(_ceil_div(s, f) for s, f in zip(shape_zyx, factor, strict=True))
        size = tuple(v * s for v, s in zip(last.voxel_size_nm_zyx, step, strict=True))
        out.append(Level(len(out), factor, shape, size))  # type: ignore[arg-type]
    return out


def _sum_pairs(a: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """Sum neighbouring pairs along ``axis`` (a trailing odd element is kept as is)."""
    n = a.shape[axis]
    even = np.take(a, np.arange(0, n - 1, 2), axis=axis)
    odd = np.take(a, np.arange(1, n, 2), axis=axis)
    out = even.astype(dtype, copy=False) + odd.astype(dtype, copy=False)
    if n % 2:
        last = np.take(a, [n - 1], axis=axis).astype(dtype, copy=False)
        out = np.concatenate([out, last], axis=axis)
    return out


_WIDER = {
    np.dtype(np.uint8): np.uint16,
    np.dtype(np.uint16): np.uint32,
    np.dtype(np.uint32): np.uint64,
}


def _sum_x_pairs(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Sum neighbouring pairs along the last, contiguous axis by viewing each pair as one wider
    integer (little-endian: low half = even element): contiguous work, no strided gather."""
    bits = a.dtype.itemsize * 8
    wide = a.view(_WIDER[a.dtype])
    mask = (1 << bits) - 1
    out = np.bitwise_and(wide, mask, dtype=wide.dtype)
    out += wide >> bits
    return out.astype(dtype, copy=False)


def _sum_pairs_fast(a: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    n = a.shape[axis]
    if n % 2:
        return _sum_pairs(a, axis, dtype)
    if (
        axis == a.ndim - 1
        and a.flags.c_contiguous
        and a.dtype in _WIDER
        and np.little_endian
        and np.dtype(dtype).itemsize >= a.dtype.itemsize * 2
    ):
        return _sum_x_pairs(a, dtype)
    sl_even = [slice(None)] * a.ndim
    sl_odd = [slice(None)] * a.ndim
    sl_even[axis] = slice(0, n, 2)
    sl_odd[axis] = slice(1, n, 2)
    return np.add(a[tuple(sl_even)], a[tuple(sl_odd)], dtype=dtype)


def _sum_cubes(a: np.ndarray, dtype: np.dtype, planes: int = 2) -> np.ndarray | None:
    """Sums of the 2x2x2 cubes of an even-sized (z, y, x) block, ``planes`` output planes at a time.

    The same integers as three whole-block pair passes, through three small buffers reused
    plane after plane (cache-resident; no block-sized temporaries that the kernel must map
    and zero): about 2x faster. None when a size is odd or ``dtype`` has no wider integer.
    """
    wide = _WIDER.get(np.dtype(dtype))
    if wide is None or any(n % 2 for n in a.shape) or not np.little_endian:
        return None
    nz, ny, nx = a.shape
    out = np.empty((nz // 2, ny // 2, nx // 2), dtype)
    g = max(1, min(planes, nz // 2))
    tz = np.empty((g, ny, nx), dtype)
    ty = np.empty((g, ny // 2, nx), dtype)
    hi = np.empty((g, ny // 2, nx // 2), wide)
    bits = np.dtype(dtype).itemsize * 8
    for z0 in range(0, nz // 2, g):
        k = min(g, nz // 2 - z0)
        np.add(
            a[2 * z0 : 2 * (z0 + k) : 2], a[2 * z0 + 1 : 2 * (z0 + k) : 2], out=tz[:k], dtype=dtype
        )
        np.add(tz[:k, 0::2], tz[:k, 1::2], out=ty[:k])
        # x pairs as one wider integer each (low half = even element), as _sum_x_pairs
        pair = ty[:k].view(wide)
        np.right_shift(pair, bits, out=hi[:k])
        np.bitwise_and(pair, (1 << bits) - 1, out=pair)
        pair += hi[:k]
        np.copyto(out[z0 : z0 + k], pair, casting="unsafe")  # the sum fits ``dtype``
    return out


def _counts_1d(n_in: int, counts_in: np.ndarray) -> np.ndarray:
    """Voxel counts per output element after pairing ``counts_in`` (length n_in)."""
    even = counts_in[0 : n_in - 1 : 2] + counts_in[1:n_in:2]
    return np.concatenate([even, counts_in[-1:]]) if n_in % 2 else even


def _divide_round_half_even(
    sums: np.ndarray, counts: np.ndarray | int, dtype: np.dtype
) -> np.ndarray:
    """round(sums / counts) with ties to even, exactly, in integers."""
    if isinstance(counts, int) and counts & (counts - 1) == 0:
        # c = 2^k: (s + c/2 - 1 + q_lowbit) >> k rounds half to even without a comparison pass
        shift = counts.bit_length() - 1
        if shift == 0:
            return sums.astype(dtype)
        t = sums >> shift
        t &= 1
        t += sums
        t += (counts >> 1) - 1
        t >>= shift
        return t.astype(dtype)
    q, r = np.divmod(sums, counts)
    twice = 2 * r
    up = (twice > counts) | ((twice == counts) & (q & 1).astype(bool))
    return (q + up).astype(dtype)


def _sum_dtype(max_value: int, n_voxels: int) -> np.dtype:
    top = (max_value + 1) * n_voxels  # room for the rounding offset
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    return np.dtype(np.uint64)


def axis_counts(extent0: int, factor: int, start: int, size: int) -> np.ndarray:
    """Level-0 voxels under each of ``size`` level voxels from ``start`` along one axis.

    A level with cumulative factor ``factor`` covers level-0 ``[i*f, min((i+1)*f, extent0))``
    with voxel ``i`` (partial only at the far edge), so counts follow from geometry alone:
    hand-offs between passes need to carry only the integer sums.
    """
    i = np.arange(start, start + size, dtype=np.int64)
    return np.minimum(factor, extent0 - i * factor)


def sum_dtype(max_value: int, n_voxels: int) -> np.dtype:
    """Narrowest unsigned integer that holds a sum of ``n_voxels`` values up to ``max_value``."""
    return _sum_dtype(max_value, n_voxels)


def divide_round(sums: np.ndarray, counts: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Means from sums: ``sums / counts`` rounded half to even, with per-axis (z, y, x) counts."""
    cz, cy, cx = counts
    if cz.min() == cz.max() and cy.min() == cy.max() and cx.min() == cx.max():
        c: np.ndarray | int = int(cz[0] * cy[0] * cx[0])
    else:
        c = (cz[:, None, None] * cy[None, :, None] * cx[None, None, :]).astype(sums.dtype)
    return _divide_round_half_even(sums, c, np.dtype(dtype))


def downsample_sums(
    sums: np.ndarray,
    counts: Sequence[np.ndarray],
    steps: Sequence[Sequence[int]],
    *,
    max_value: int,
    dtype: np.dtype,
    keep_sums: bool = False,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Levels below a block of integer sums, each rounded once from the level-0 sums it covers.

    Parameters
    ----------
    sums
        (z, y, x) sums of level-0 voxels per voxel of the block's level (for level 0:
        the voxels themselves). The block starts on a multiple of every step's
        cumulative factor; only blocks at the volume's far edge may end off the grid.
    counts
        Per-axis level-0 voxel counts of the block's voxels (see :func:`axis_counts`).
    steps
        One (fz, fy, fx) step per output level, each entry 1 or 2.
    max_value, dtype
        Largest level-0 value and the dtype of the rounded levels.
    keep_sums
        Also return the sums (and implicitly counts) of the last level, for a later pass.

    Returns
    -------
    levels, last_sums
        One rounded (z, y, x) array per step; the last level's sums or None.
    """
    if sums.dtype.kind != "u":
        raise TypeError(f"downsample needs unsigned integers, got {sums.dtype}")
    counts = [np.asarray(c, dtype=np.int64) for c in counts]
    total = int(counts[0].max() * counts[1].max() * counts[2].max())
    out = []
    for step in steps:
        total *= int(np.prod(step))
        sdtype = _sum_dtype(max_value, total)
        cubes = _sum_cubes(sums, sdtype) if tuple(step) == (2, 2, 2) else None
        if cubes is not None:
            counts = [_counts_1d(n, c) for n, c in zip(sums.shape, counts, strict=True)]
            sums = cubes
            out.append(divide_round(sums, counts, dtype))
            continue
        for axis, f in enumerate(step):  # z and y first: whole rows, contiguous
            if f == 1:
                continue
            if f != 2:
                raise ValueError(f"steps must be 1 or 2 per axis, got {step}")
            n = sums.shape[axis]
            sums = _sum_pairs_fast(sums, axis, sdtype)
            counts[axis] = _counts_1d(n, counts[axis])
        out.append(divide_round(sums, counts, dtype))
    return out, (sums if keep_sums else None)


def downsample_levels(block_zyx: np.ndarray, steps: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Mean-downsample a block by successive per-axis steps of 1 or 2, rounding once per level.

    Every level is computed from integer sums of the block's own voxels (not from
    the rounded level above), then rounded half to even. The block must start on a
    multiple of each level's cumulative factor (true for units cut on chunk grids);
    blocks whose far edge is the volume's edge may have odd sizes.

    Parameters
    ----------
    block_zyx
        (z, y, x) unsigned-integer block.
    steps
        One (fz, fy, fx) step per output level, each entry 1 or 2.

    Returns
    -------
    list of arrays
        One (z, y, x) array per step, same dtype as the block.
    """
    dtype = block_zyx.dtype
    if dtype.kind != "u":
        raise TypeError(f"downsample_levels needs unsigned integers, got {dtype}")
    counts = [np.ones(n, dtype=np.int64) for n in block_zyx.shape]
    levels, _ = downsample_sums(
        block_zyx, counts, steps, max_value=int(np.iinfo(dtype).max), dtype=dtype
    )
    return levels


def steps_between(levels: Sequence[Level], first: int, last: int) -> list[tuple[int, int, int]]:
    """Per-level steps to go from level ``first`` to each of levels first+1..last."""
    out = []
    for k in range(first + 1, last + 1):
        a, b = levels[k - 1].factor_zyx, levels[k].factor_zyx
        out.append(tuple(bb // aa for aa, bb in zip(a, b, strict=True)))
    return out  # type: ignore[return-value]


def reference_pyramid(volume_zyx: np.ndarray, levels: Sequence[Level]) -> list[np.ndarray]:
    """Whole-volume pyramid in memory (level 0 included): the reference tests compare with."""
    return [volume_zyx, *downsample_levels(volume_zyx, steps_between(levels, 0, len(levels) - 1))]
