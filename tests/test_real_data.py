"""Ingest the real EM stacks in ../shared/data and compare level 0 with the source pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from emflow import discover, recipe_from_dict, run
from emflow.pyramid import reference_pyramid
from tests.readers import precomputed_cloudvolume, validate_ome_zarr, zarr_python

pytestmark = [pytest.mark.real_data, pytest.mark.integration]


def test_isbi_png_stack(shared_data, tmp_path):
    src = shared_data / "isbi2012-sstem" / "train"
    recipe = recipe_from_dict(
        {
            "source": {"pattern": str(src / "%02d.png"), "z_start": 0, "z_stop": 30},
            "voxel_size_nm": [4, 4, 50],
            "align": False,
            "enhance": {"clip_limit": 0},
            "output_dir": str(tmp_path),
            "outputs": [
                {"format": "precomputed", "encoding": "raw"},
                {"format": "omezarr", "version": "0.4"},
            ],
        }
    )
    result = run(recipe)
    volume = np.stack(
        [cv2.imread(str(src / f"{z:02d}.png"), cv2.IMREAD_UNCHANGED) for z in range(30)]
    )
    assert volume.shape == (30, 512, 512)
    ref = reference_pyramid(volume, result.plan.levels)
    for k in range(len(ref)):
        np.testing.assert_array_equal(
            precomputed_cloudvolume(result.output_paths["precomputed"], k), ref[k]
        )
        np.testing.assert_array_equal(zarr_python(result.output_paths["omezarr"], k), ref[k])
    validate_ome_zarr(result.output_paths["omezarr"])


def test_drosophila_tiff_stack(shared_data, tmp_path):
    src = shared_data / "sstem-drosophila-vnc" / "stack1" / "raw"
    recipe = recipe_from_dict(
        {
            "source": {"directory": str(src), "z_start": 2, "z_stop": 18},
            "voxel_size_nm": [4.6, 4.6, 45],
            "align": False,
            "enhance": {"clip_limit": 0},
            "output_dir": str(tmp_path),
            "outputs": [{"format": "omezarr", "version": "0.5"}],
        }
    )
    cat = discover(recipe)
    assert [s.source_z for s in cat.slices] == list(range(2, 18))
    result = run(recipe)
    volume = np.stack([tifffile.imread(src / f"{z:02d}.tif") for z in range(2, 18)])
    np.testing.assert_array_equal(zarr_python(result.output_paths["omezarr"], 0), volume)


def test_jpeg_tiles_and_multipage_tiff(shared_data, tmp_path):
    """JPEG input (FAFB tiles) and a multi-page TIFF built from them: one page per z."""
    tiles = sorted((shared_data / "fafb-temca2-tiles" / "1").rglob("*.jpg"))[:3]
    pages = np.stack([cv2.imread(str(t), cv2.IMREAD_UNCHANGED) for t in tiles])
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")
    for source, name in (
        ({"glob": str(tiles[0].parent.parent / "*" / "*.jpg"), "z_stop": 3}, "jpg"),
        ({"glob": str(tmp_path / "stack.tif")}, "tif"),
    ):
        recipe = recipe_from_dict(
            {
                "source": source,
                "voxel_size_nm": [4, 4, 40],
                "align": False,
                "enhance": {"clip_limit": 0},
                "output_dir": str(tmp_path / name),
                "outputs": [{"format": "omezarr"}],
            }
        )
        result = run(recipe)
        np.testing.assert_array_equal(zarr_python(result.output_paths["omezarr"], 0), pages)
