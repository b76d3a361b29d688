"""Pairwise matching: accuracy on real EM texture under known affines, model choice, failures."""

from __future__ import annotations

import glob
import json

import cv2
import numpy as np
import pytest
import tifffile

from emflow.align.features import compute_features
from emflow.align.match import MatchConfig, PairResult, match, match_features
from emflow.align.warp import invert_affine, warp_slice
from emflow.errors import AlignmentError
from emflow.testing.transforms import (
    apply_to_stack,
    compose,
    corner_error_px,
    random_affines,
)
from tests.conftest import DATA

ISBI = sorted(glob.glob(f"{DATA}/isbi2012-sstem/train/*.png"))
VNC = sorted(glob.glob(f"{DATA}/sstem-drosophila-vnc/stack1/raw/*.tif"))
pytestmark = pytest.mark.skipif(not (ISBI and VNC), reason=f"real EM test data not found at {DATA}")
#: 100 px translations are 20 % of a 512 px slice (40 % between two slices): widen the
#: outlier limit that is meant for real data (default 0.25 of the long side).
WIDE = MatchConfig(max_translation_fraction=0.5)


def _noisy(img: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    """Add Gaussian noise to the non-fill pixels, keeping fill exactly 0 (uint8)."""
    out = np.clip(np.rint(img + rng.normal(0, sigma, img.shape)), 1, 255).astype(np.uint8)
    return np.where(img > 0, out, 0).astype(np.uint8)


def _same_section_errors(stack: np.ndarray, config: MatchConfig) -> list[float]:
    """Each real section under two independent random affines (+ noise sigma 8): corner errors."""
    shape = stack.shape[1:]
    wa, ta = apply_to_stack(stack, random_affines(len(stack), shape_yx=shape, seed=11))
    wb, tb = apply_to_stack(stack, random_affines(len(stack), shape_yx=shape, seed=12))
    rng = np.random.default_rng(0)
    errors = []
    for z in range(len(stack)):
        fa = compute_features(_noisy(wa[z], rng))
        fb = compute_features(_noisy(wb[z], rng))
        p = match_features(fa, fb, z_a=z, z_b=z, config=config)
        assert p.ok, p.reason
        assert p.model == "affine"
        errors.append(corner_error_px(p.matrix_array, compose(invert_affine(ta[z]), tb[z]), shape))
    return errors


def test_pair_accuracy_isbi_512():
    stack = np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in ISBI[:8]])
    e = _same_section_errors(stack, WIDE)
    print(f"\nISBI 512^2 pairs: median {np.median(e):.3f} px, max {np.max(e):.3f} px")
    assert np.median(e) <= 0.1
    assert np.max(e) <= 0.5


def test_pair_accuracy_vnc_1024():
    stack = np.stack([tifffile.imread(p) for p in VNC[:3]])
    e = _same_section_errors(stack, MatchConfig())
    print(f"\nVNC 1024^2 pairs: median {np.median(e):.3f} px, max {np.max(e):.3f} px")
    assert np.median(e) <= 0.1
    assert np.max(e) <= 0.5


@pytest.fixture(scope="module")
def vnc0() -> np.ndarray:
    return tifffile.imread(VNC[0])


def _warp_same(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    return warp_slice(img, m, (0, 0), img.shape)


@pytest.mark.parametrize(
    ("matrix", "model"),
    [
        (np.array([[1.0, 0.0, 12.3], [0.0, 1.0, -7.6]]), "translation"),
        (cv2.getRotationMatrix2D((511.5, 511.5), 1.5, 1.0), "rigid"),
        (np.array([[1.01, 0.004, -5.0], [-0.003, 0.992, 9.0]]), "affine"),
    ],
)
def test_auto_model_choice_in_pixels(vnc0, matrix, model):
    """The simplest model within 1 px (corners) of the affine is chosen, and is accurate."""
    moved = _warp_same(vnc0, matrix)  # pixel p of vnc0 lands at matrix @ p in `moved`
    p = match(moved, vnc0, downsample=2)
    assert p.ok, p.reason
    assert p.model == model
    assert p.corner_gap_px < 1.0
    assert corner_error_px(p.matrix_array, matrix, vnc0.shape) < 0.25


def test_downsampled_features_are_in_full_resolution_pixels(vnc0):
    m = np.array([[1.0, 0.0, 20.25], [0.0, 1.0, -13.5]])
    moved = _warp_same(vnc0, m)
    for ds in (1, 2, 4):
        p = match(moved, vnc0, downsample=ds, model="translation")
        assert p.ok, p.reason
        assert corner_error_px(p.matrix_array, m, vnc0.shape) < 0.1 * ds + 0.05


def test_uint16_input_matches(vnc0):
    m = np.array([[1.0, 0.0, 5.5], [0.0, 1.0, 3.25]])
    a16 = vnc0.astype(np.uint16) * 200
    p = match(_warp_same(a16, m), a16, downsample=2)
    assert p.ok and corner_error_px(p.matrix_array, m, vnc0.shape) < 0.2


def test_blank_and_noise_fail_with_reason(vnc0):
    blank = np.zeros_like(vnc0)
    p = match(vnc0, blank, downsample=2, z_a=4, z_b=5)
    assert not p.ok and "too few keypoints in slice 5" in p.reason
    noise = np.random.default_rng(0).integers(1, 256, vnc0.shape, dtype=np.uint8)
    q = match(vnc0, noise, downsample=2)
    assert not q.ok and ("inliers" in q.reason or "matches" in q.reason)


def test_outlier_checks_use_config(vnc0):
    m = np.array([[1.0, 0.0, 300.0], [0.0, 1.0, 0.0]])
    p = match(_warp_same(vnc0, m), vnc0, downsample=2, max_translation_fraction=0.2)
    assert not p.ok and "translation out of range (300.0 px > 0.2 x 1024 px)" in p.reason
    q = match(_warp_same(vnc0, m), vnc0, downsample=2)  # default: half the slice
    assert q.ok, q.reason


def test_deterministic(vnc0):
    m = cv2.getRotationMatrix2D((500.0, 500.0), 0.7, 1.0)
    a, b = _warp_same(vnc0, m), vnc0
    assert match(a, b, downsample=2) == match(a, b, downsample=2)


def test_bad_config_raises_alignment_error_naming_the_field():
    with pytest.raises(AlignmentError, match=r"align\.model .*'similarity'"):
        MatchConfig(model="similarity")
    with pytest.raises(AlignmentError, match=r"align\.ratio"):
        MatchConfig(ratio=1.5)


def test_pair_result_dict_round_trip_is_exact():
    m = ((1.0, 1e-17, 0.1), (0.3, 1.0, -2.5))
    aff = ((1.0000000000000002, 0.0, 0.1), (0.3, 1.0, -2.5))
    p = PairResult(3, 5, True, "", "rigid", m, aff, 123, 456, 0.123456789, 0.5)
    assert PairResult.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    f = PairResult(
        1,
        2,
        False,
        "too few matches (3 < 20)",
        "affine",
        ((1, 0, 0), (0, 1, 0)),
        ((1, 0, 0), (0, 1, 0)),
        0,
        3,
        float("nan"),
        float("nan"),
    )
    d = json.loads(json.dumps(f.to_dict(), allow_nan=False))
    assert PairResult.from_dict(d).to_dict() == f.to_dict()


def test_patch_peak_offsets_equal_the_per_peak_formula():
    """The area matcher's sub-pixel peaks, computed for all patches at once, are bit for bit
    the per-peak formula (Gaussian through 3 samples; parabola where one is not positive)."""
    import math

    from emflow.align.area import _parabola, _peak_offsets

    rng = np.random.default_rng(7)
    y0 = rng.uniform(0.2, 1.0, 5000)
    ym = y0 - rng.uniform(-0.05, 0.6, 5000)  # incl. non-positive and flat or rising sides
    yp = y0 - rng.uniform(-0.05, 0.6, 5000)
    ym[:50], yp[50:100] = 0.0, y0[50:100]  # exact zeros, a flat pair
    want = [
        _parabola(a, b, c)
        if min(a, b, c) <= 0
        else _parabola(math.log(a), math.log(b), math.log(c))
        for a, b, c in zip(ym.tolist(), y0.tolist(), yp.tolist(), strict=True)
    ]
    got = _peak_offsets(ym, y0, yp)
    assert got.tolist() == want
    assert np.all(np.abs(got) <= 0.5) and np.count_nonzero(got) > 4000


def _matcher_ratio_matches(fa, fb, ratio: float) -> tuple[list[int], list[int]]:
    """The ratio test on cv2.FlannBasedMatcher's DMatch pairs (the matcher's own path)."""
    cv2.setRNGSeed(0)
    matcher = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 32})
    ib, ia = [], []
    for pair in matcher.knnMatch(fb.descriptors, fa.descriptors, k=2):
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            ib.append(pair[0].queryIdx)
            ia.append(pair[0].trainIdx)
    return ib, ia


@pytest.mark.parametrize("ratio", [0.75, 0.9, 0.8123])
def test_flann_ratio_matches_equal_the_matchers_dmatch_pairs(ratio):
    """Above FLANN_MIN_KEYPOINTS the ratio test runs on FLANN's index directly: the same
    matches, in the same order, as cv2.FlannBasedMatcher's DMatch pairs (same seed)."""
    from emflow.align.match import FLANN_MIN_KEYPOINTS, _ratio_matches
    from emflow.testing import synthetic_slices

    a, b = synthetic_slices((2, 1536, 1536), seed=3)
    fa, fb = compute_features(a, downsample=1), compute_features(b, downsample=1)
    assert min(len(fa), len(fb)) > FLANN_MIN_KEYPOINTS
    ib, ia = _ratio_matches(fa, fb, MatchConfig(ratio=ratio))
    want_b, want_a = _matcher_ratio_matches(fa, fb, ratio)
    assert ib.tolist() == want_b and ia.tolist() == want_a
    assert len(want_b) > 200
