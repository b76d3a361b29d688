"""Cheap per-slice checks that flag slices unusable for alignment (blank, saturated, noise).

A slice is judged on its non-zero pixels (exact 0 is fill) and on a block-averaged working
copy (same factor as feature detection), so the cost is a few ms per megapixel. Real EM
content is spatially correlated at the working scale (lag-1 autocorrelation ~0.8-0.95);
white noise, a blank frame or a featureless smear is not. Match failures on both
neighbours are the second, independent signal (:func:`emflow.align.solve.solve`).
"""

from __future__ import annotations

import numpy as np

from emflow.align.features import choose_downsample

__all__ = ["assess_slice"]

#: Less than this fraction of non-zero pixels -> "blank".
MIN_VALID_FRACTION = 0.01
#: Standard deviation of the non-zero pixels below this fraction of the dtype range -> "blank".
MIN_STD_FRACTION = 1e-3
#: More than this fraction of the non-zero pixels at the dtype maximum -> "saturated".
MAX_SATURATED_FRACTION = 0.5
#: Lag-1 autocorrelation (best of x and y) below this at the working scale -> noise.
MIN_AUTOCORRELATION = 0.3


def _lag1_correlation(a: np.ndarray, valid: np.ndarray, axis: int) -> float:
    n = a.shape[axis]
    if n < 2:
        return 0.0
    s0 = [slice(None)] * 2
    s1 = [slice(None)] * 2
    s0[axis], s1[axis] = slice(0, n - 1), slice(1, n)
    both = valid[tuple(s0)] & valid[tuple(s1)]
    x, y = a[tuple(s0)][both], a[tuple(s1)][both]
    if x.size < 16 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def assess_slice(image: np.ndarray) -> str | None:
    """Whether a (y, x) slice can be aligned: None if usable, else the reason.

    Parameters
    ----------
    image : numpy.ndarray
        ``(y, x)`` slice, uint8/uint16 (or float in 0..1); exact 0 is fill.

    Returns
    -------
    str or None
        ``"blank"``, ``"saturated"``, ``"featureless/noise"`` or None.
    """
    if image.ndim != 2 or image.size == 0:
        return "blank"
    top = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    valid = image != 0
    if valid.mean() < MIN_VALID_FRACTION:
        return "blank"
    values = image[valid]
    if np.mean(values >= top) > MAX_SATURATED_FRACTION:
        return "saturated"
    if float(values.std()) < MIN_STD_FRACTION * top:
        return "blank"
    f = choose_downsample(image.shape)
    h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    blocks = image[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f)
    small = blocks.mean(axis=(1, 3))
    small_valid = valid[:h, :w].reshape(h // f, f, w // f, f).all(axis=(1, 3))
    rho = max(_lag1_correlation(small, small_valid, 0), _lag1_correlation(small, small_valid, 1))
    if rho < MIN_AUTOCORRELATION:
        return "featureless/noise"
    return None
