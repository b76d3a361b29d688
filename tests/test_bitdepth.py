"""16-bit input: windowed to uint8 (fixed window or sampled percentiles), or kept as uint16."""

from __future__ import annotations

import numpy as np
import tifffile

from emflow import recipe_from_dict, run
from emflow.bitdepth import window_to_uint8
from emflow.pyramid import reference_pyramid
from emflow.testing import synthetic_stack
from tests.readers import zarr_python


def _stack16(tmp_path):
    vol = synthetic_stack((6, 90, 70), seed=4, dtype=np.uint16)
    (tmp_path / "src").mkdir()
    for z, sl in enumerate(vol):
        tifffile.imwrite(tmp_path / "src" / f"s{z:02d}.tif", sl)
    return vol


def _recipe(tmp_path, out, depth):
    return recipe_from_dict(
        {
            "source": {"glob": str(tmp_path / "src" / "*.tif")},
            "voxel_size_nm": [8, 8, 8],
            "align": False,
            "enhance": {"clip_limit": 0},
            "output_dir": str(tmp_path / out),
            "outputs": [{"format": "omezarr", "version": "0.4"}],
            "depth": depth,
        }
    )


def test_fixed_window_and_uint16_kept(tmp_path):
    vol = _stack16(tmp_path)
    res = run(_recipe(tmp_path, "w", {"window": [10000, 40000]}))
    expected = window_to_uint8(vol, 10000, 40000)
    got = zarr_python(res.output_paths["omezarr"], 0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    res16 = run(_recipe(tmp_path, "k", {"output": "uint16"}))
    ref = reference_pyramid(vol, res16.plan.levels)
    for k in range(len(ref)):
        np.testing.assert_array_equal(zarr_python(res16.output_paths["omezarr"], k), ref[k])


def test_percentile_window_is_sampled(tmp_path):
    vol = _stack16(tmp_path)
    res = run(_recipe(tmp_path, "p", {"percentiles": [1, 99]}))
    got = zarr_python(res.output_paths["omezarr"], 0)
    # about 1 % of voxels saturate at each end, and the range is used
    assert 0.002 < np.mean(got == 255) < 0.05
    assert got.min() <= 3 and vol.dtype == np.uint16


def test_window_maps_zero_background_to_zero():
    img = np.array([[0, 5000, 10000, 60000]], np.uint16)
    assert window_to_uint8(img, 5000, 10000).tolist() == [[0, 0, 255, 255]]
