"""Order statistics of integer-valued images from a histogram, equal to NumPy's bit for bit.

The working and area copies of a slice are stretched between two percentiles of their valid
pixels. For uint8/uint16 slices those copies hold integers (OpenCV's block mean of an integer
image is an integer image), so the percentiles follow from a histogram of the masked copy
(``cv2.calcHist``: no masked copy, no partition of ~1 M float32) instead of
``np.percentile(copy[mask], q)``: ~2-3 ms instead of ~10-15 ms per 1024² copy. The result is
the same float64 values: the order statistics are read from the cumulative histogram and
combined exactly as NumPy's default ("linear") method combines them (checked against
``np.percentile`` in tests/test_align_stats.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["block_mean_percentiles", "masked_percentiles"]

#: calcHist counts in float32: exact up to 2**24 px (a 4096² copy); above, NumPy is used
_EXACT_COUNTS = 1 << 24
#: grey levels of the slice dtypes whose block means (OpenCV INTER_AREA) are integers
_INT_LEVELS = {np.dtype(np.uint8): 256, np.dtype(np.uint16): 65536}


def block_mean_percentiles(
    small: np.ndarray, keep: np.ndarray, q: Sequence[float], slice_dtype: np.dtype
) -> np.ndarray:
    """``np.percentile(small[keep], q)`` for block means ``small`` of a slice of
    ``slice_dtype``: from a histogram when the slice is uint8/uint16 (its block means are
    integers), else NumPy's."""
    levels = _INT_LEVELS.get(np.dtype(slice_dtype))
    if levels is None:
        return np.percentile(small[keep], q)
    return masked_percentiles(small, keep, q, levels)


def masked_percentiles(
    image: np.ndarray, keep: np.ndarray, q: Sequence[float], levels: int
) -> np.ndarray:
    """``np.percentile(image[keep], q)`` (float64, linear method) for a float32 image whose
    values are integers in ``[0, levels)`` (e.g. the block means of a uint8 slice, ``levels``
    256; uint16: 65536). ``keep``: bool mask of the same shape. Needs at least one kept px."""
    if image.dtype != np.float32 or image.size >= _EXACT_COUNTS or keep.shape != image.shape:
        return np.percentile(image[keep], q)
    hist = cv2.calcHist([image], [0], keep.view(np.uint8), [int(levels)], [0, int(levels)])
    counts = np.cumsum(hist.ravel().astype(np.int64))
    n = int(counts[-1])
    if n != int(np.count_nonzero(keep)):  # a value outside [0, levels): NumPy's way
        return np.percentile(image[keep], q)
    # np.percentile: quantiles q / 100, virtual index (n - 1) * quantile, its floor and the next
    quantiles = np.true_divide(np.asarray(q, np.float64), 100)
    virtual = (n - 1) * quantiles
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = -1
    nxt[above] = -1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    gamma = np.asarray(virtual - prev, dtype=np.float64)
    # the k-th smallest kept value (k = -1: the largest) is the first level whose cumulative
    # count exceeds k
    ks = np.concatenate([prev, nxt]).astype(np.int64)
    ks[ks < 0] += n
    values = np.searchsorted(counts, ks, side="right").astype(np.float32)
    a, b = values[: len(quantiles)], values[len(quantiles) :]
    # NumPy's _lerp: a + (b - a) t, or b - (b - a) (1 - t) where t >= 0.5
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return out
