"""Unit functions run on workers: render a slab, build a coarse block, sample a 16-bit window.

Arguments are small frozen dataclasses (picklable); the functions are plain Python and
NumPy with no Dask, so the serial path and notebooks call them directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from emflow.align.warp import warp_slice
from emflow.bitdepth import sample_percentiles, window_to_uint8
from emflow.discover import SliceRef
from emflow.enhance import clahe
from emflow.errors import SourceError
from emflow.io.readers import read_image
from emflow.io.slicecache import load_slice
from emflow.pyramid import Level, downsample_levels, steps_between


@dataclass(frozen=True)
class SlabJob:
    """What one slab unit needs: its slices, how to render them, where to write."""

    z0: int
    refs: tuple[SliceRef, ...]
    shape_yx: tuple[int, int]
    frame_shape_yx: tuple[int, int]
    transforms: tuple[tuple[tuple[float, ...], ...] | None, ...]  # per slice 2x3 or None
    window: tuple[float, float] | None
    out_dtype: str
    clip_limit: float
    kernel_size_px: int
    levels: tuple[Level, ...]
    last_level: int
    writers: tuple[Any, ...]
    handoff: Any = None
    threads: int = 2
    in_dtype: str = "uint8"  # the source slices' dtype (from the catalog's headers)
    cache_dir: str | None = None  # decoded slices kept by the feature pass (zstd-1)
    source_index: tuple[int, ...] = ()  # per slice: catalog z whose pixels it shows (fill_previous)


def _load_slice(
    ref: SliceRef,
    shape_yx: tuple[int, int],
    dtype: np.dtype,
    cache_dir: str | None = None,
    cache_z: int | None = None,
) -> np.ndarray:
    if ref.fill == "zero" or ref.path is None:
        return np.zeros(shape_yx, dtype=dtype)
    if cache_dir is not None and cache_z is not None:
        cached = load_slice(cache_dir, cache_z, shape_yx, dtype)
        if cached is not None:
            return cached
    img = read_image(ref.path, ref.page)
    if img.shape != tuple(shape_yx) or img.dtype != dtype:
        raise SourceError(
            f"{ref.path} decodes to {img.shape[::-1]} {img.dtype}, but its header said "
            f"{tuple(shape_yx)[::-1]} {dtype}: the file is damaged; re-export it"
        )
    return img


def _render_slice(job: SlabJob, i: int, in_dtype: np.dtype) -> np.ndarray:
    """Decode, warp into the output frame, convert to the output dtype, and CLAHE one slice."""
    ref = job.refs[i]
    src_z = job.source_index[i] if job.source_index else None
    img = _load_slice(ref, job.shape_yx, in_dtype, job.cache_dir, src_z)
    matrix = job.transforms[i]
    if matrix is not None:
        img = warp_slice(img, np.asarray(matrix, dtype=np.float64), (0, 0), job.frame_shape_yx)
    if job.out_dtype == "uint8" and img.dtype != np.uint8:
        lo, hi = job.window or (0.0, 65535.0)
        img = window_to_uint8(img, lo, hi)
    if job.clip_limit > 0:
        img = clahe(
            img,
            origin_yx=(0, 0),
            frame_shape_yx=job.frame_shape_yx,
            kernel_size_px=job.kernel_size_px,
            clip_limit=job.clip_limit,
        )
    return img


def render_slab(job: SlabJob) -> dict:
    """Render one slab and write levels 0..last of it to every output; returns a small summary."""
    import cv2

    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    in_dtype = np.dtype(job.in_dtype)
    n = len(job.refs)
    slab = np.empty((n, *job.frame_shape_yx), dtype=job.out_dtype)

    def one(i: int) -> None:
        slab[i] = _render_slice(job, i, in_dtype)

    with ThreadPoolExecutor(max_workers=max(1, job.threads)) as pool:
        list(pool.map(one, range(n)))
    t_render = time.perf_counter()
    # level 0 is encoded and written by tensorstore's threads while the levels are computed
    pending = _start_writes(job.writers, job.levels, [slab], 0, job.z0, job.handoff, job.last_level)
    coarser = downsample_in_bands(slab, steps_between(job.levels, 0, job.last_level), job.threads)
    t_ds = time.perf_counter()
    pending += _start_writes(
        job.writers, job.levels, coarser, 1, job.z0, job.handoff, job.last_level
    )
    for fut in pending:
        fut.result()
    t_end = time.perf_counter()
    return {
        "z0": job.z0,
        "z1": job.z0 + n,
        "bytes_in": int(n * job.shape_yx[0] * job.shape_yx[1] * in_dtype.itemsize),
        "seconds": {"render": t_render - t0, "downsample": t_ds - t_render, "write": t_end - t_ds},
    }


def downsample_in_bands(
    block: np.ndarray, steps: Sequence[Sequence[int]], threads: int
) -> list[np.ndarray]:
    """:func:`~emflow.pyramid.downsample_levels` on y-bands in parallel threads (numpy frees the GIL).

    Bands start on multiples of the total y factor, so each band's levels are exactly the
    whole block's rows (chunked equals whole); results are concatenated along y.
    """
    if not steps:
        return []
    fy = int(np.prod([s[1] for s in steps]))
    ny = block.shape[1]
    band = -(-ny // max(1, threads))
    band = -(-band // fy) * fy
    if threads <= 1 or band >= ny:
        return downsample_levels(block, steps)
    cuts = [(y0, min(y0 + band, ny)) for y0 in range(0, ny, band)]
    with ThreadPoolExecutor(max_workers=len(cuts)) as pool:
        parts = list(pool.map(lambda c: downsample_levels(block[:, c[0] : c[1]], steps), cuts))
    return [np.concatenate([p[k] for p in parts], axis=1) for k in range(len(steps))]


def _start_writes(
    writers: Sequence[Any],
    levels: Sequence[Level],
    arrays: Sequence[np.ndarray],
    first: int,
    z0_first: int,
    handoff: Any,
    last: int,
) -> list[Any]:
    """Start writing arrays of levels ``first..`` (block at z0_first in level-``first`` voxels).

    Returns the pending write futures; the arrays must stay untouched until they resolve.
    """
    f0 = levels[first].factor_zyx[0]
    pending = []
    for offset, arr in enumerate(arrays):
        k = first + offset
        zk = z0_first * f0 // levels[k].factor_zyx[0]
        pending += [w.write(k, zk, arr) for w in writers]
        if handoff is not None and k == last:
            pending.append(handoff.write(zk, arr))
    return pending


@dataclass(frozen=True)
class CoarseJob:
    """One block of a coarse pass: read level ``source`` [z0, z1), write levels first..last."""

    z0: int
    z1: int
    source: int
    first: int
    last: int
    levels: tuple[Level, ...]
    writers: tuple[Any, ...]
    source_array: Any
    handoff: Any = None
    threads: int = 2


def build_coarse_block(job: CoarseJob) -> dict:
    """Downsample one block of the hand-off level into the coarse levels it owns."""
    t0 = time.perf_counter()
    block = job.source_array.read(job.z0, job.z1)
    arrays = downsample_in_bands(
        block, steps_between(job.levels, job.source, job.last), job.threads
    )
    # arrays[i] is level source+1+i (first == source + 1)
    for fut in _start_writes(
        job.writers, job.levels, arrays, job.first, _z_at(job), job.handoff, job.last
    ):
        fut.result()
    return {"z0": job.z0, "z1": job.z1, "level": job.source, "seconds": time.perf_counter() - t0}


def _z_at(job: CoarseJob) -> int:
    """z0 of the block in level ``source + 1`` voxels."""
    ratio = job.levels[job.source + 1].factor_zyx[0] // job.levels[job.source].factor_zyx[0]
    return job.z0 // ratio


def sample_window(refs: Sequence[SliceRef], percentiles: tuple[float, float]) -> dict:
    """Estimate a 16-bit → 8-bit window from up to 16 evenly spaced slices."""
    real = [r for r in refs if r.fill is None and r.path]
    picks = real[:: max(1, len(real) // 16)][:16]
    samples = [read_image(r.path, r.page)[::4, ::4] for r in picks]
    lo, hi = sample_percentiles(samples, percentiles)
    return {"window": [lo, hi], "slices": [r.z for r in picks]}
