"""warp_slice: tile windows equal crops of the whole-frame warp; background is exactly 0."""

from __future__ import annotations

import numpy as np
import pytest

from emflow.align.warp import invert_affine, warp_slice

M = np.array([[0.9986, -0.0523, 37.25], [0.0531, 1.0021, -11.6]])  # ~3 deg, small shear


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(1, 65535, size=(301, 417), dtype=np.uint16)
    img[:20] = 0  # fill inside the source stays 0
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tile_equals_crop_of_whole(image, dtype):
    img = (image // 257).astype(dtype) if dtype == np.uint8 else image.astype(dtype)
    frame = (340, 460)
    whole = warp_slice(img, M, (0, 0), frame)
    assert whole.dtype == img.dtype and whole.shape == frame
    # uneven tiles, including ones crossing the frame edge and outside it
    for y0, x0, h, w in [
        (0, 0, 5, 7),
        (13, 29, 97, 131),
        (250, 400, 90, 60),
        (333, 7, 7, 453),
        (-20, -30, 50, 70),
    ]:
        tile = warp_slice(img, M, (y0, x0), (h, w))
        ref = np.zeros((h, w), img.dtype)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + h, frame[0]), min(x0 + w, frame[1])
        ref[ys - y0 : ye - y0, xs - x0 : xe - x0] = whole[ys:ye, xs:xe]
        if y0 < 0 or x0 < 0:  # outside the frame is still a valid global window
            big = warp_slice(img, M, (y0, x0), (h - y0, w - x0))
            ref = big[:h, :w]
        np.testing.assert_array_equal(tile, ref)


def test_background_is_exactly_zero_and_identity_is_exact(image):
    out = warp_slice(image, M, (0, 0), (340, 460))
    corners = np.array([[0, 0, 1], [416, 0, 1], [0, 300, 1], [416, 300, 1]], float) @ M.T
    assert out[0, 0] == 0 and out[-1, 0] == 0  # outside the warped slice
    assert corners[:, 0].min() > 0
    np.testing.assert_array_equal(warp_slice(image, np.eye(2, 3), (0, 0), image.shape), image)
    shifted = warp_slice(image, np.array([[1.0, 0, 5], [0, 1.0, 3]]), (0, 0), (310, 430))
    np.testing.assert_array_equal(shifted[3:304, 5:422], image)
    assert not shifted[:3].any() and not shifted[:, :5].any()


def test_invert_affine_round_trip():
    np.testing.assert_allclose(invert_affine(invert_affine(M)), M, atol=1e-12)


def test_sources_wider_than_opencv_remap_limit():
    """OpenCV remap is limited to 32767 px; warp_slice hands it only the needed crop."""
    img = np.random.default_rng(2).integers(1, 255, size=(6, 40000), dtype=np.uint8)
    out = warp_slice(img, np.array([[1.0, 0, 3.0], [0, 1.0, 1.0]]), (0, 0), (7, 40003))
    np.testing.assert_array_equal(out[1:, 3:], img)
    assert not out[0].any() and not out[:, :3].any()
    tail = warp_slice(img, np.array([[1.0, 0, 3.0], [0, 1.0, 1.0]]), (2, 39000), (3, 1003))
    np.testing.assert_array_equal(tail, out[2:5, 39000:])
