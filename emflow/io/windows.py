"""Read a (y, x) window of a slice without decoding the rest: uncompressed, contiguous TIFF pages.

Units cut in x/y read only their window of such slices (a memory map of the page), so a
stack of big uncompressed TIFFs needs no rendered copy. Other files return None and are
decoded whole by the caller.
"""

from __future__ import annotations

import mmap
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4096)
def contiguous_page(path: str, page: int = 0) -> tuple[int, tuple[int, int], str] | None:
    """(byte offset, (y, x) shape, dtype) of an uncompressed contiguous 2D TIFF page, else None."""
    if not path.lower().endswith((".tif", ".tiff")):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            p = tif.pages[page]
            if not p.is_contiguous or p.compression != 1 or len(p.shape) != 2:
                return None
            if not p.is_memmappable or p.dtype.byteorder not in ("=", "|", "<"):
                return None
            return int(p.dataoffsets[0]), (int(p.shape[0]), int(p.shape[1])), p.dtype.name
    except Exception:  # unreadable here: the caller decodes, and reports the error
        return None


def read_window(path: str, page: int, window: tuple[int, int, int, int], out: np.ndarray) -> bool:
    """Copy rows y0:y1, columns x0:x1 of a page into ``out``; False if the page is not windowable.

    Maps only the window's rows (a plain ``mmap``, unmapped right after the copy): numpy's
    ``memmap`` class costs ~0.2 CPU-s per GB read more in Python for the same pages."""
    layout = contiguous_page(path, page)
    if layout is None:
        return False
    offset, (ny, nx), dtype = layout
    y0, y1, x0, x1 = window
    y1 = min(y1, ny)  # as slicing a whole-page map would
    row = nx * np.dtype(dtype).itemsize
    start = offset + y0 * row
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    length = start - aligned + (y1 - y0) * row
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), length, offset=aligned, access=mmap.ACCESS_READ)
    try:
        rows = np.frombuffer(mm, dtype, (y1 - y0) * nx, start - aligned).reshape(y1 - y0, nx)
        try:
            out[...] = rows[:, x0:x1]
        finally:
            del rows  # the map closes only once no array refers to it
    finally:
        mm.close()
    return True


def windowable(path: str | None, page: int = 0) -> bool:
    return path is not None and contiguous_page(str(path), page) is not None


def stack_windowed(refs: list) -> bool:
    """True when the stack's slices can be read by window (first, middle and last checked;
    a slice that cannot is decoded whole, so this only decides the plan, never correctness)."""
    real = [r for r in refs if getattr(r, "fill", None) is None and getattr(r, "path", None)]
    if not real:
        return False
    picks = {0, len(real) // 2, len(real) - 1}
    return all(windowable(str(real[i].path), real[i].page) for i in picks)
