"""CLAHE: tiles with a halo equal the whole frame exactly; background 0 stays 0."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emflow.enhance import clahe, clahe_halo_px
from tests.conftest import DATA

VNC0 = DATA / "sstem-drosophila-vnc" / "stack1" / "raw" / "00.tif"


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    try:
        img = tifffile.imread(VNC0)[:700, :900]
    except FileNotFoundError:
        img = np.random.default_rng(0).integers(0, 256, (700, 900), dtype=np.uint8)
    out = np.where(img == 0, 1, img).astype(np.uint8)  # real zeros would read as background
    out[:, :150] = 0  # warped-in background strip
    out[600:, 700:] = 0
    return out


def _tiles(frame_shape, k):
    h = clahe_halo_px(k)
    for y0, y1, x0, x1 in [
        (0, 233, 0, 317),
        (233, 700, 317, 900),
        (101, 555, 5, 12),
        (0, 700, 450, 451),
    ]:
        yield (
            (y0, y1, x0, x1),
            (
                max(0, y0 - h),
                min(frame_shape[0], y1 + h),
                max(0, x0 - h),
                min(frame_shape[1], x1 + h),
            ),
        )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("k", [64, 101])
def test_tiles_equal_whole_frame(frame, dtype, k):
    img = frame.astype(dtype) * (257 if dtype == np.uint16 else 1)
    whole = clahe(
        img, origin_yx=(0, 0), frame_shape_yx=img.shape, kernel_size_px=k, clip_limit=0.02
    )
    assert whole.dtype == dtype
    for (y0, y1, x0, x1), (ty0, ty1, tx0, tx1) in _tiles(img.shape, k):
        tile = clahe(
            img[ty0:ty1, tx0:tx1],
            origin_yx=(ty0, tx0),
            frame_shape_yx=img.shape,
            kernel_size_px=k,
            clip_limit=0.02,
        )
        np.testing.assert_array_equal(
            tile[y0 - ty0 : y1 - ty0, x0 - tx0 : x1 - tx0], whole[y0:y1, x0:x1]
        )


def test_background_stays_zero_and_tissue_nonzero(frame):
    out = clahe(frame, origin_yx=(0, 0), frame_shape_yx=frame.shape, kernel_size_px=128)
    np.testing.assert_array_equal(out == 0, frame == 0)
    tissue = frame > 0
    assert out[tissue].std() > frame[tissue].std()  # contrast is enhanced


def test_fixed_intensity_range_not_per_tile(frame):
    """A dim tile (max well below 255) is not stretched to the dtype range by itself."""
    dim = (frame // 4).astype(np.uint8)
    dim[frame == 0] = 0
    dim[(frame > 0) & (dim == 0)] = 1
    a = clahe(dim, origin_yx=(0, 0), frame_shape_yx=dim.shape, kernel_size_px=700, clip_limit=0.001)
    assert a[dim > 0].max() < 200  # mild clip limit keeps it close to a linear map of 0..255


def test_clip_limit_zero_is_identity_and_halo(frame):
    assert clahe(frame, origin_yx=(0, 0), frame_shape_yx=frame.shape, clip_limit=0) is frame
    assert clahe_halo_px(1024) == 1536 and clahe_halo_px(101) >= 101


def test_tile_outside_frame_is_rejected(frame):
    with pytest.raises(ValueError, match="exceeds frame"):
        clahe(frame, origin_yx=(10, 0), frame_shape_yx=frame.shape)
