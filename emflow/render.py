"""Unit functions run on workers: render slices, build a brick's pyramid, sample a 16-bit window.

Arguments are small frozen dataclasses (picklable); the functions are plain Python and
NumPy with no Dask, so the serial path and notebooks call them directly. Boxes are
``(z0, z1, y0, y1, x0, x1)`` half-open, in voxels of the level named beside them.
"""

from __future__ import annotations

import math
import sys
import threading
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
from emflow.io import rendercache, windows
from emflow.io.readers import read_image
from emflow.io.slicecache import drop_slice, load_slice
from emflow.memory import limit_malloc_arenas, no_huge_page_advice
from emflow.pyramid import Level, axis_counts, divide_round, downsample_sums, steps_between

Box = tuple[int, int, int, int, int, int]


# ---------------------------------------------------------------------------------------
# one slice: decode → warp → 8 bit → CLAHE
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceRender:
    """How to turn source slices into output-frame slices (shared by every slice of a run)."""

    shape_yx: tuple[int, int]
    frame_shape_yx: tuple[int, int]
    window: tuple[float, float] | None
    out_dtype: str
    clip_limit: float
    kernel_size_px: int
    in_dtype: str = "uint8"  # the source slices' dtype (from the catalog's headers)
    cache_dir: str | None = None  # decoded source slices kept by the feature pass (zstd-1)


@dataclass(frozen=True)
class SliceJob:
    """One slice: its source, its 2x3 transform (or None) and the catalog z it shows."""

    ref: SliceRef
    transform: tuple[tuple[float, ...], ...] | None
    source_z: int | None = None  # catalog z whose pixels it shows (fill_previous)
    last_use: bool = False  # no other slice shows source_z: its cached copy may go once read


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


def render_one(how: SliceRender, job: SliceJob, *, drop_cached: bool = False) -> np.ndarray:
    """Decode, warp into the output frame, convert to the output dtype, and CLAHE one slice.

    ``drop_cached``: delete the slice's cached decoded copy once read when this job is its
    last reader (:attr:`SliceJob.last_use`; the render stage, which reads every slice once).
    """
    img = _load_slice(job.ref, how.shape_yx, np.dtype(how.in_dtype), how.cache_dir, job.source_z)
    if drop_cached and job.last_use and how.cache_dir is not None and job.source_z is not None:
        drop_slice(how.cache_dir, job.source_z)  # its pages go to this slice's rendered copy
    if job.transform is not None:
        img = warp_slice(
            img, np.asarray(job.transform, dtype=np.float64), (0, 0), how.frame_shape_yx
        )
    if how.out_dtype == "uint8" and img.dtype != np.uint8:
        lo, hi = how.window or (0.0, 65535.0)
        img = window_to_uint8(img, lo, hi)
    if how.clip_limit > 0:
        img = clahe(
            img,
            origin_yx=(0, 0),
            frame_shape_yx=how.frame_shape_yx,
            kernel_size_px=how.kernel_size_px,
            clip_limit=how.clip_limit,
        )
    return img


def render_window(
    how: SliceRender, job: SliceJob, window: tuple[int, int, int, int], out: np.ndarray
) -> None:
    """Write window (y0, y1, x0, x1) of one rendered slice into ``out``.

    Without a transform or CLAHE, an uncompressed TIFF page is read by window only (see
    :mod:`emflow.io.windows`); otherwise the slice is rendered whole and cropped.
    """
    y0, y1, x0, x1 = window
    ref = job.ref
    if job.transform is None and how.clip_limit == 0 and ref.fill != "zero" and ref.path:
        raw = out if np.dtype(how.in_dtype) == out.dtype else np.empty(out.shape, how.in_dtype)
        if windows.read_window(str(ref.path), ref.page, window, raw):
            if raw is not out:
                lo, hi = how.window or (0.0, 65535.0)
                out[...] = window_to_uint8(raw, lo, hi)
            return
    out[...] = render_one(how, job)[y0:y1, x0:x1]


def render_slices(
    how: SliceRender, jobs: Sequence[SliceJob], folder: str, drop_cached: bool = False
) -> dict:
    """Render unit: slices, one after the other, into the run folder's rendered level-0 copy.

    ``drop_cached``: delete each slice's cached decoded copy once read (see :func:`render_one`);
    a unit run again after that decodes the source instead (same pixels).
    """
    import cv2

    limit_malloc_arenas()
    no_huge_page_advice()
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    for job in jobs:
        rendercache.store_slice(folder, job.ref.z, render_one(how, job, drop_cached=drop_cached))
    nbytes = len(jobs) * how.shape_yx[0] * how.shape_yx[1] * np.dtype(how.in_dtype).itemsize
    return {
        "z": [jobs[0].ref.z, jobs[-1].ref.z + 1] if jobs else [],
        "bytes_in": int(nbytes),
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------
# a brick: its levels source..last written, the sums of the next level handed off
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrickJob:
    """One unit of a pass: ``box`` of level ``source``, writing levels ``source..last``.

    Pass 0 (``source == 0``) reads slices: rendering them itself (``slices``) or from the
    rendered copy (``render_dir``); later passes read hand-off sums (``source_array``).
    """

    index: int
    box: Box
    source: int
    last: int
    handoff_level: int | None
    levels: tuple[Level, ...]
    writers: tuple[Any, ...]
    out_dtype: str
    handoff: Any = None  # HandoffArray receiving the sums of handoff_level
    source_array: Any = None  # HandoffArray holding the sums of level `source` (pass > 0)
    how: SliceRender | None = None
    slices: tuple[SliceJob, ...] = ()  # pass 0, rendering here: one per z of the box
    render_dir: str | None = None  # pass 0: rendered slices to read instead
    threads: int = 2

    @property
    def bytes_in(self) -> int:
        """Source bytes this unit stands for (for progress rates)."""
        if self.source != 0 or self.how is None:
            return 0
        z0, z1, y0, y1, x0, x1 = self.box
        ny, nx = self.how.frame_shape_yx
        sy, sx = self.how.shape_yx
        share = (y1 - y0) * (x1 - x0) / (ny * nx)
        return int((z1 - z0) * sy * sx * np.dtype(self.how.in_dtype).itemsize * share)


_SPARE = threading.local()  # per unit thread: the last finished unit's level-0 block


def _take_block(shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    """A block buffer: the one this thread's previous unit finished with when it has this shape
    (no fresh pages for the kernel to zero, unit after unit), else a new one."""
    spare = getattr(_SPARE, "block", None)
    _SPARE.block = None
    if spare is not None and spare.shape == shape and spare.dtype == np.dtype(dtype):
        return spare
    del spare
    return np.empty(shape, dtype=dtype)


def _read_block(job: BrickJob) -> np.ndarray:
    """Level-0 voxels of the box: rendered here (full frames) or read from the rendered copy."""
    import cv2

    cv2.setNumThreads(1)
    z0, z1, y0, y1, x0, x1 = job.box
    assert job.how is not None
    block = _take_block((z1 - z0, y1 - y0, x1 - x0), job.out_dtype)
    if job.render_dir is not None:
        frame = job.how.frame_shape_yx

        def one(i: int) -> None:
            rendercache.read_window(
                job.render_dir, z0 + i, frame, block.dtype, (y0, y1, x0, x1), block[i]
            )

    else:

        def one(i: int) -> None:
            render_window(job.how, job.slices[i], (y0, y1, x0, x1), block[i])

    with ThreadPoolExecutor(max_workers=max(1, job.threads)) as pool:
        list(pool.map(one, range(z1 - z0)))
    return block


def build_brick(job: BrickJob) -> dict:
    """Read one brick, write its levels to every output, hand off the next level's sums."""
    limit_malloc_arenas()
    no_huge_page_advice()
    t0 = time.perf_counter()
    levels = job.levels
    extent0 = levels[0].shape_zyx
    z0, z1, y0, y1, x0, x1 = job.box
    origin = (z0, y0, x0)
    fs = levels[job.source].factor_zyx
    counts = [
        axis_counts(extent0[a], fs[a], origin[a], (z1 - z0, y1 - y0, x1 - x0)[a]) for a in range(3)
    ]
    if job.source == 0:
        block = _read_block(job)
        sums = block
    else:
        sums = job.source_array.read(job.box)
        block = divide_round(sums, counts, np.dtype(job.out_dtype))
    t_read = time.perf_counter()
    held = sys.getrefcount(block)  # references before the writers reference it
    # level `source` is encoded by tensorstore's threads while the levels below are computed
    pending = [w.write(job.source, origin, block) for w in job.writers]
    deepest = job.handoff_level if job.handoff_level is not None else job.last
    steps = steps_between(levels, job.source, deepest)
    max_value = 65535 if job.out_dtype == "uint16" else 255
    coarser, last_sums = downsample_in_bands(
        sums,
        counts,
        steps,
        job.threads,
        max_value=max_value,
        dtype=np.dtype(job.out_dtype),
        keep_sums=job.handoff_level is not None,
    )
    t_ds = time.perf_counter()
    for offset, arr in enumerate(coarser):
        k = job.source + 1 + offset
        if k > job.last:
            break
        pending += [w.write(k, _origin_at(levels, job.source, k, origin), arr) for w in job.writers]
    if job.handoff_level is not None:
        assert last_sums is not None
        h_origin = _origin_at(levels, job.source, job.handoff_level, origin)
        pending.append(job.handoff.write(h_origin, last_sums))
    while pending:
        pending.pop().result()
    # every write is durable; once tensorstore dropped its references to the block (the
    # writers encode from it, Writer.write), the next unit of this thread may reuse it
    if job.source == 0 and sys.getrefcount(block) <= held:
        _SPARE.block = block
    t_end = time.perf_counter()
    return {
        "box": list(job.box),
        "level": job.source,
        "bytes_in": job.bytes_in,
        "seconds": {"read": t_read - t0, "downsample": t_ds - t_read, "write": t_end - t_ds},
    }


def _origin_at(
    levels: Sequence[Level], source: int, k: int, origin: tuple[int, int, int]
) -> tuple[int, int, int]:
    fs, fk = levels[source].factor_zyx, levels[k].factor_zyx
    return tuple(o * s // f for o, s, f in zip(origin, fs, fk, strict=True))  # type: ignore[return-value]


def downsample_in_bands(
    sums: np.ndarray,
    counts: Sequence[np.ndarray],
    steps: Sequence[Sequence[int]],
    threads: int,
    *,
    max_value: int,
    dtype: np.dtype,
    keep_sums: bool = False,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """:func:`~emflow.pyramid.downsample_sums` on y-bands in parallel threads (numpy frees the GIL).

    Bands start on multiples of the total y factor, so each band's levels are exactly the
    whole block's rows (chunked equals whole); results are concatenated along y.
    """
    if not steps:
        return [], (sums if keep_sums else None)
    fy = math.prod(s[1] for s in steps)
    ny = sums.shape[1]
    band = -(-ny // max(1, threads))
    band = -(-band // fy) * fy
    if threads <= 1 or band >= ny:
        return downsample_sums(
            sums, counts, steps, max_value=max_value, dtype=dtype, keep_sums=keep_sums
        )
    cuts = [(y0, min(y0 + band, ny)) for y0 in range(0, ny, band)]

    def part(c: tuple[int, int]) -> tuple[list[np.ndarray], np.ndarray | None]:
        cz, cy, cx = counts
        return downsample_sums(
            sums[:, c[0] : c[1]],
            (cz, cy[c[0] : c[1]], cx),
            steps,
            max_value=max_value,
            dtype=dtype,
            keep_sums=keep_sums,
        )

    with ThreadPoolExecutor(max_workers=len(cuts)) as pool:
        parts = list(pool.map(part, cuts))
    levels = [np.concatenate([p[0][k] for p in parts], axis=1) for k in range(len(steps))]
    last = np.concatenate([p[1] for p in parts], axis=1) if keep_sums else None  # type: ignore[misc]
    return levels, last


def sample_window(refs: Sequence[SliceRef], percentiles: tuple[float, float]) -> dict:
    """Estimate a 16-bit → 8-bit window from up to 16 evenly spaced slices."""
    real = [r for r in refs if r.fill is None and r.path]
    picks = real[:: max(1, len(real) // 16)][:16]
    samples = [read_image(r.path, r.page)[::4, ::4] for r in picks]
    lo, hi = sample_percentiles(samples, percentiles)
    return {"window": [lo, hi], "slices": [r.z for r in picks]}


def warm_up() -> None:
    """Import what units need (tensorstore, OpenCV, the writers) so the first unit need not.

    The driver asks every worker to run this as soon as it has a client, while it still
    discovers slices and plans; it returns nothing and writes nothing.
    """
    import cv2  # noqa: F401
    import tensorstore  # noqa: F401

    limit_malloc_arenas()
    no_huge_page_advice()

    import emflow.io.handoff
    import emflow.io.omezarr
    import emflow.io.precomputed
    import emflow.lattice.execute  # noqa: F401
