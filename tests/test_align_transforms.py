"""emflow.testing.transforms: bounds of the random affines and the truth convention."""

from __future__ import annotations

import numpy as np

from emflow.align.match import linear_distortion
from emflow.align.warp import invert_affine, warp_slice
from emflow.testing.transforms import (
    apply_to_stack,
    compose,
    corner_error_px,
    pair_truth,
    random_affines,
    stack_errors_px,
)


def test_random_affines_respect_bounds_and_seed():
    shape = (512, 600)
    ms = random_affines(200, shape_yx=shape, seed=5)
    c = np.array([(600 - 1) / 2, (512 - 1) / 2])
    for m in ms:
        assert np.linalg.norm(m[:, :2] @ c + m[:, 2] - c) <= 100 + 1e-9
        assert abs(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))) <= 2.0 + 0.05
        scale, shear = linear_distortion(m)
        assert abs(scale) <= 0.0101 and shear <= 0.0101
    assert all(
        np.array_equal(a, b)
        for a, b in zip(ms, random_affines(200, shape_yx=shape, seed=5), strict=True)
    )


def test_corner_error_px():
    a = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    b = np.array([[1.0, 0, 0.5], [0, 1.0, 0]])
    assert corner_error_px(a, b, (10, 20)) == 0.5
    rot = np.array([[1.0, -0.01, 0], [0.01, 1.0, 0]])
    assert np.isclose(corner_error_px(a, rot, (101, 201)), np.hypot(1.0, 2.0))


def test_truth_convention_maps_warped_slices_back():
    """truth_z (= D_z^-1) is source -> global: warping the distorted slice by it restores S_z."""
    rng = np.random.default_rng(1)
    stack = rng.integers(1, 255, size=(2, 64, 80), dtype=np.uint8)
    d = [np.array([[1.0, 0, 3.0], [0, 1.0, -2.0]]), np.array([[1.0, 0, -4.0], [0, 1.0, 5.0]])]
    warped, truth = apply_to_stack(stack, d)
    back = warp_slice(warped[1], truth[1], (0, 0), (64, 80))
    np.testing.assert_array_equal(back[5:-5, 5:-5], stack[1][5:-5, 5:-5])
    # pair truth maps slice 1 coords into slice 0 coords: (x, y) + (7, -7)
    np.testing.assert_allclose(pair_truth(truth, 0, 1), [[1, 0, 7], [0, 1, -7]], atol=1e-12)
    est = {
        0: compose(np.array([[1, 0, 9.0], [0, 1, 9.0]]), truth[0]),
        1: compose(np.array([[1, 0, 9.0], [0, 1, 9.0]]), truth[1]),
    }
    errs = stack_errors_px(est, truth, (64, 80))
    assert max(errs.values()) < 1e-9  # a common global transform is not an error
    assert np.allclose(invert_affine(truth[0]), d[0])
