"""Discovery: headers only, natural sort, z ranges, gaps, multi-page TIFF, 16-bit."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emflow.discover import discover, natural_key
from emflow.errors import SourceError
from emflow.io.readers import read_header, read_image
from emflow.recipe import Source
from emflow.testing import write_stack


def test_natural_sort():
    names = ["img10.png", "img2.png", "img1.png"]
    assert sorted(names, key=natural_key) == ["img1.png", "img2.png", "img10.png"]


def test_glob_gaps_are_missing_slices(tmp_path):
    for z in (1, 2, 10, 11):
        write_stack([np.full((8, 9), z, np.uint8)], tmp_path, pattern="s%d.png", z_start=z)
    with pytest.raises(SourceError, match=r"missing.*3-9"):
        discover(Source(glob=str(tmp_path / "*.png")))
    cat = discover(Source(glob=str(tmp_path / "*.png"), missing="fill_previous"))
    assert [s.source_z for s in cat.slices] == list(range(1, 12))
    assert cat.slices[4].fill == "previous" and cat.slices[4].path.endswith("s2.png")
    cat = discover(Source(glob=str(tmp_path / "*.png"), z_start=10, z_stop=12))
    assert [s.path.rsplit("/", 1)[1] for s in cat.slices] == ["s10.png", "s11.png"]


def test_pattern_with_fill_zero(tmp_path):
    write_stack([np.ones((4, 5), np.uint8)] * 3, tmp_path, pattern="a%03d.png")
    (tmp_path / "a001.png").unlink()
    cat = discover(
        Source(pattern=str(tmp_path / "a%03d.png"), z_start=0, z_stop=3, missing="fill_zero")
    )
    assert [s.fill for s in cat.slices] == [None, "zero", None]
    assert cat.missing == (1,) and cat.shape_zyx == (3, 4, 5)


def test_multipage_and_16bit_tiff(tmp_path):
    pages = np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7) * 100
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")
    cat = discover(Source(directory=str(tmp_path)))
    assert cat.shape_zyx == (3, 6, 7) and cat.dtype == "uint16"
    assert [s.page for s in cat.slices] == [0, 1, 2]
    np.testing.assert_array_equal(read_image(cat.slices[2].path, 2), pages[2])
    assert read_header(tmp_path / "stack.tif").pages == 3


def test_colour_png_is_refused_naming_the_file(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SourceError, match=r"rgb\.png.*colour"):
        discover(Source(glob=str(tmp_path / "*.png")))
