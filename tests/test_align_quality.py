"""assess_slice flags blank, saturated and noise slices and passes real EM."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from emflow.align.quality import assess_slice
from emflow.testing.transforms import insert_bad_slices
from tests.conftest import DATA

ISBI = sorted(str(p) for p in (DATA / "isbi2012-sstem" / "train").glob("*.png"))


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    if not ISBI:
        pytest.skip(f"real EM test data not found at {DATA}")
    return np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in ISBI[:4]])


def test_real_slices_pass_and_bad_ones_are_flagged(stack):
    assert [assess_slice(s) for s in stack] == [None] * 4
    bad = insert_bad_slices(stack, {1: "blank", 2: "noise"})
    assert [assess_slice(s) for s in bad] == [None, "blank", "featureless/noise", None]
    np.testing.assert_array_equal(bad[[0, 3]], stack[[0, 3]])


def test_constant_saturated_and_uint16(stack):
    assert assess_slice(np.full((64, 64), 77, np.uint8)) == "blank"
    assert assess_slice(np.full((64, 64), 255, np.uint8)) == "saturated"
    assert assess_slice(stack[0].astype(np.uint16) * 256) is None
    half = stack[0].copy()
    half[:, :256] = 0  # warped-in fill does not make a slice bad
    assert assess_slice(half) is None
