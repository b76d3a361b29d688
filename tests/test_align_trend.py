"""Trend removal (emflow.align.trend): a linear turn and walk along z is taken out exactly,
what varies from slice to slice is kept, and the result depends on the content, not on
where the slices sit in their canvases."""

from __future__ import annotations

import numpy as np
import pytest

from emflow.align.trend import detrend, footprint_pose
from emflow.align.warp import warp_slice
from emflow.testing.transforms import compose, corner_error_px, random_affines

SHAPE = (400, 600)


def _rigid(deg: float, tx: float, ty: float, about=(299.5, 199.5)) -> np.ndarray:
    th = np.deg2rad(deg)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.asarray(about)
    return np.hstack([r, (c + np.array([tx, ty]) - r @ c)[:, None]])


def _angle(m: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(m[1, 0], m[0, 0])))


def test_a_linear_trend_is_removed_and_the_jitter_kept():
    """Slices turning 0.1° and walking (0.5, -0.3) px per section, plus their own jitter:
    after detrending the turn and walk are gone and each slice keeps its own jitter exactly
    (relative to the trend), so neighbours move against each other by at most the slope."""
    rng = np.random.default_rng(7)
    n = 12
    jitter = [_rigid(rng.normal(0, 0.05), *rng.normal(0, 1.5, 2)) for _ in range(n)]
    trend = [_rigid(0.1 * z - 0.4, 0.5 * z + 20, -0.3 * z - 7) for z in range(n)]
    placed = {z: compose(trend[z], jitter[z]) for z in range(n)}
    out = detrend(placed, SHAPE)
    angles = np.array([_angle(out[z]) for z in range(n)])
    jitter_angles = np.array([_angle(j) for j in jitter])
    slope = np.polyfit(range(n), angles, 1)[0]
    assert abs(slope) < 1e-9 and abs(angles.mean()) < 1e-9
    # the jitter (about its mean and trend) is what is left
    expected = jitter_angles - np.polyval(np.polyfit(range(n), jitter_angles, 1), range(n))
    assert np.allclose(angles, expected, atol=1e-9)
    centres = np.array([out[z][:2] @ [299.5, 199.5, 1.0] for z in range(n)])
    assert np.allclose(centres.mean(axis=0), [299.5, 199.5], atol=1e-6)  # mean placement: identity
    for axis in (0, 1):
        assert abs(np.polyfit(range(n), centres[:, axis], 1)[0]) < 0.01  # was 0.5, -0.3
    for z in range(n - 1):  # neighbour-to-neighbour change: within the trend's slope
        before = compose(np.linalg.inv(np.vstack([placed[z], [0, 0, 1]]))[:2], placed[z + 1])
        after = compose(np.linalg.inv(out[z])[:2], out[z + 1][:2])
        assert corner_error_px(before, after, SHAPE) <= 0.1 * np.pi / 180 * 361 + 0.6 + 1e-6


def test_footprint_pose_of_a_turned_rectangle():
    """The non-fill region of a slice turned by 1.5° and moved by (30, -12) px: centroid and
    angle of the turned rectangle; an image without fill gives its centre and 0°."""
    img = np.full((300, 400), 200, np.uint8)
    canvas = (500, 600)
    m = _rigid(1.5, 30 + 100, -12 + 100, about=(199.5, 149.5))
    warped = warp_slice(img, m, (0, 0), canvas)
    x, y, th = footprint_pose(warped)
    assert np.hypot(x - (199.5 + 130), y - (149.5 + 88)) < 0.5
    assert abs(np.degrees(th) - 1.5) < 0.05
    x, y, th = footprint_pose(img, 1)
    assert (x, y) == (199.5, 149.5) and abs(th) < 1e-12
    assert footprint_pose(np.zeros((50, 50), np.uint8)) is None


@pytest.mark.parametrize("seed", [1, 2])
def test_detrend_follows_the_content_not_the_canvas(seed):
    """The same placed content, once as full images and once misplaced inside padded canvases
    (footprints moved with them): detrended alike up to one global transform."""
    n = 9
    rng = np.random.default_rng(seed)
    content = {
        z: _rigid(0.12 * z + rng.normal(0, 0.05), 0.8 * z + rng.normal(0, 1), -0.5 * z)
        for z in range(n)
    }
    pad = 150
    warps = [
        np.asarray(d, np.float64) + np.array([[0, 0, pad], [0, 0, pad]])
        for d in random_affines(n, seed=seed, max_scale_shear=0.0, shape_yx=SHAPE)
    ]
    img = np.full(SHAPE, 90, np.uint8)
    feet = {}
    for z, d in enumerate(warps):
        canvas = (SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad)
        feet[z] = footprint_pose(warp_slice(img, d, (0, 0), canvas))
    g = _rigid(3.0, 40, -25)  # the misplaced stack's solve lands in another global frame
    misplaced = {
        z: compose(g, compose(content[z], np.linalg.inv(np.vstack([d, [0, 0, 1]]))[:2]))
        for z, d in enumerate(warps)
    }
    ref = detrend(content, SHAPE)
    out = detrend(misplaced, SHAPE, footprints=feet)
    # compare T_z D_z with ref_z up to one global transform (fitted on slice 0)
    got = {z: compose(out[z][:2], warps[z]) for z in range(n)}
    fix = compose(ref[0][:2], np.linalg.inv(np.vstack([got[0], [0, 0, 1]]))[:2])
    errs = [corner_error_px(compose(fix, got[z]), ref[z][:2], SHAPE) for z in range(n)]
    assert max(errs) < 0.5, errs
    # without footprints the canvas placement leaks into the trend
    blind = detrend(misplaced, SHAPE)
    got = {z: compose(blind[z][:2], warps[z]) for z in range(n)}
    fix = compose(ref[0][:2], np.linalg.inv(np.vstack([got[0], [0, 0, 1]]))[:2])
    assert max(corner_error_px(compose(fix, got[z]), ref[z][:2], SHAPE) for z in range(n)) > 2
