"""The histogram shortcuts of a features unit give NumPy's numbers: the percentiles of the
working and area copies bit for bit, the slice QC's statistics (and so its verdicts)."""

from __future__ import annotations

import numpy as np
import pytest

from emflow.align.area import area_copy
from emflow.align.features import working_copy
from emflow.align.quality import _integer_stats, assess_slice
from emflow.align.stats import masked_percentiles


@pytest.mark.parametrize("levels", [256, 65536])
def test_masked_percentiles_equal_numpy_bit_for_bit(levels):
    rng = np.random.default_rng(3)
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        kind = trial % 4
        if kind == 0:
            img = rng.integers(0, levels, (h, w))
        elif kind == 1:  # one value
            img = np.full((h, w), rng.integers(0, levels))
        elif kind == 2:  # few values: ties at the order statistics
            img = rng.integers(0, 3, (h, w)) * ((levels - 1) // 2)
        else:  # narrow histogram
            img = np.clip(rng.normal(levels / 2, levels / 60, (h, w)), 0, levels - 1)
            img = img.astype(np.int64)
        img = img.astype(np.float32)
        keep = rng.random((h, w)) < rng.uniform(0.05, 1.0)
        keep.flat[0] = True
        for q in ([0.1, 99.9], [0.5, 99.5], [0, 100], [50]):
            want = np.percentile(img[keep], q)
            got = masked_percentiles(img, keep, q, levels)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (trial, q)


def test_masked_percentiles_of_values_outside_the_levels_are_numpys():
    img = np.array([[1.0, 2.0, 300.0, 7.0]], np.float32)  # 300: not one of 256 levels
    keep = np.ones(img.shape, bool)
    got = masked_percentiles(img, keep, [10, 90], 256)
    assert got.tobytes() == np.percentile(img[keep], [10, 90]).tobytes()


def _numpy_working_copy(image: np.ndarray, f: int) -> np.ndarray:
    """working_copy's stretch with np.percentile, as before the histogram (no fill)."""
    import cv2

    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    small = cv2.resize(image[:h, :w], (w // f, h // f), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    lo, hi = np.percentile(small.ravel(), [0.1, 99.9])
    work = (small - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(work, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_working_and_area_copies_equal_the_numpy_stretch(dtype):
    rng = np.random.default_rng(11)
    top = np.iinfo(dtype).max
    img = np.clip(rng.normal(top / 2, top / 8, (517, 389)), 1, top).astype(dtype)
    for f in (1, 2, 3):
        work, valid = working_copy(img, f)
        assert valid.all()
        assert work.tobytes() == _numpy_working_copy(img, f).tobytes()
    # the area copy, with fill: the same as the stretch of NumPy's percentiles of its valid px
    img[:100, :150] = 0
    copy, g = area_copy(img, 2)
    import cv2

    small = cv2.resize(img[:516, :388], (194, 258), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    valid = copy > 0
    lo, hi = np.percentile(small[valid], [0.5, 99.5])
    scaled = np.clip(np.rint(1 + (small - lo) * (254.0 / (hi - lo))), 1, 255).astype(np.uint8)
    assert copy[valid].tobytes() == scaled[valid].tobytes()
    assert not valid[:45, :70].any() and valid.mean() > 0.8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_slice_qc_statistics_equal_numpys(dtype):
    rng = np.random.default_rng(2)
    top = np.iinfo(dtype).max
    for trial in range(60):
        sample = rng.integers(0, top + 1, (50, 70)).astype(dtype)
        if trial % 3 == 0:
            sample[rng.random(sample.shape) < 0.6] = top  # saturated
        if trial % 5 == 0:
            sample[:] = rng.integers(0, 3)  # blank-ish
        values = sample[sample != 0]
        share, std = _integer_stats(sample)
        if values.size == 0:
            assert std is None
            continue
        assert share == np.mean(values >= top)  # the same float
        assert std == pytest.approx(float(values.std()), rel=1e-12, abs=1e-12)
    assert assess_slice(np.zeros((64, 64), dtype)) == "blank"
    assert assess_slice(np.full((64, 64), top, dtype)) == "saturated"
    assert assess_slice(np.full((64, 64), 3, dtype)) == "blank"
