"""Rendered level-0 slices kept in the run folder for units cut in x/y.

When pass-0 units do not span the whole frame, each slice is rendered once (decode,
warp, 8 bit, CLAHE) by a ``render`` unit and stored raw (uncompressed: writing and
reading it costs a memory copy, where zstd-1 would cost ~20 % of a PNG decode for a
1.2× ratio on EM data); units then read only their (y, x) window of each slice. Files
are written atomically and deleted when the run completes. For a remote output_dir the
folder is a URL in the bucket (one object per slice; a window is one ranged read of its
rows).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emflow.io.location import get_range, is_url, join, put_bytes

FOLDER = "rendered"


def cache_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def slice_path(folder: str | Path, z: int) -> Path:
    return Path(folder) / f"z{z:06d}.raw"


def store_slice(folder: str | Path, z: int, image: np.ndarray) -> None:
    """Write one rendered (y, x) slice (atomic rename)."""
    if is_url(folder):
        put_bytes(join(folder, f"z{z:06d}.raw"), np.ascontiguousarray(image).tobytes())
        return
    path = slice_path(folder, z)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    np.ascontiguousarray(image).tofile(tmp)
    tmp.replace(path)


def read_window(
    folder: str | Path,
    z: int,
    frame_yx: tuple[int, int],
    dtype: np.dtype,
    window: tuple[int, int, int, int],
    out: np.ndarray,
) -> None:
    """Copy rows y0:y1, columns x0:x1 of slice ``z`` into ``out`` (reads only those rows)."""
    y0, y1, x0, x1 = window
    ny, nx = frame_yx
    if is_url(folder):  # the rows y0:y1 are one byte range
        row = nx * np.dtype(dtype).itemsize
        data = get_range(join(folder, f"z{z:06d}.raw"), y0 * row, y1 * row)
        if data is None or len(data) != (y1 - y0) * row:
            raise FileNotFoundError(f"rendered slice z={z} missing in {folder}")
        out[...] = np.frombuffer(data, dtype).reshape(y1 - y0, nx)[:, x0:x1]
        return
    mm = np.memmap(slice_path(folder, z), dtype=dtype, mode="r", shape=(ny, nx))
    try:
        out[...] = mm[y0:y1, x0:x1]
    finally:
        del mm
