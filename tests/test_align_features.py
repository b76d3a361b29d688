"""Features: working-copy factor, fill masking, blank slices, pickling, no dask in align code."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.ndimage import binary_opening, distance_transform_edt

import emflow
from emflow.align.features import choose_downsample, compute_features, working_copy
from emflow.align.warp import warp_slice
from tests.conftest import DATA

VNC0 = DATA / "sstem-drosophila-vnc" / "stack1" / "raw" / "00.tif"


def test_choose_downsample_keeps_working_copy_1k_to_2k():
    assert choose_downsample((512, 512)) == 1
    assert choose_downsample((1024, 2047)) == 1
    assert choose_downsample((2048, 100)) == 2
    assert choose_downsample((8192, 8192)) == 8
    for n in range(1024, 40000, 777):
        assert 1024 <= n // choose_downsample((n, 10)) < 2048


def test_blank_slice_gives_zero_keypoints():
    f = compute_features(np.zeros((600, 700), np.uint16))
    assert len(f) == 0 and f.keypoints_xy.shape == (0, 2) and f.descriptors.shape == (0, 128)
    assert len(compute_features(np.full((300, 300), 9, np.uint8))) == 0


def test_no_keypoints_in_or_at_the_edge_of_fill():
    try:
        img = tifffile.imread(VNC0)
    except FileNotFoundError:
        pytest.skip(f"real EM test data not found at {DATA}")
    m = np.array([[0.999, -0.035, 60.0], [0.035, 0.999, 40.0]])
    warped = warp_slice(img, m, (0, 0), img.shape)
    fill = warped == 0
    assert fill[:40].all()  # there is a fill region
    dist = distance_transform_edt(~_large(fill))  # px to the nearest large zero region
    for ds in (1, 2):
        f = compute_features(warped, downsample=ds)
        assert len(f) > 500
        x, y = np.rint(f.keypoints_xy).astype(int).T
        assert dist[y, x].min() >= 8 * ds, ds
    assert pickle.loads(pickle.dumps(f)).keypoints_xy.tobytes() == f.keypoints_xy.tobytes()


def _large(fill: np.ndarray) -> np.ndarray:
    return binary_opening(fill, np.ones((5, 5), bool))


def test_working_copy_centres_and_stretch():
    img = np.zeros((8, 8), np.uint16)
    img[:, 4:] = 1000
    img[:, :4] = 10
    work, valid = working_copy(img, 2)
    assert work.shape == (4, 4) and work.dtype == np.uint8
    assert work[0, 0] == 0 and work[0, 3] == 255 and valid.all()


def test_align_and_enhance_do_not_import_dask():
    root = Path(emflow.__file__).parent
    files = [
        *sorted((root / "align").glob("*.py")),
        root / "enhance.py",
        root / "testing" / "transforms.py",
    ]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("dask", "distributed") for n in names), path


def test_lazy_coarse_set_equals_the_eager_one(tmp_path):
    """The pipeline's features unit keeps the coarse working copy instead of its SIFT; the
    coarse set a pair makes from it has the eager set's keypoints and descriptors, bit for
    bit, and the pair fits the same (VNC neighbours: the working scale finds too few
    inliers, the coarse set matches)."""
    from emflow.align.match import MatchConfig, match_features
    from emflow.align_stage import _load_features, features_unit, match_unit
    from emflow.discover import SliceRef

    paths, eager = [], []
    for z in (0, 1):
        src = VNC0.with_name(f"{z:02d}.tif")
        if not src.exists():
            pytest.skip(f"real EM test data not found at {DATA}")
        paths.append(str(tmp_path / f"z{z}.npz"))
        features_unit(SliceRef(z, z, str(src), 0), (1024, 1024), None, 4000, paths[-1])
        eager.append(compute_features(tifffile.imread(src)))
    lazy = [_load_features(p) for p in paths]
    for e, f in zip(eager, lazy, strict=True):
        assert f.coarse is None and f.coarse_copy is not None
        c = f.coarse_set()
        assert c.downsample == e.coarse.downsample == 4 and len(c) > 300
        assert c.keypoints_xy.tobytes() == e.coarse.keypoints_xy.tobytes()
        assert c.descriptors.tobytes() == e.coarse.descriptors.tobytes()
        assert f.keypoints_xy.tobytes() == e.keypoints_xy.tobytes()
    # SIFT alone (no area refinement): the coarse set's fit is the result
    got = match_unit(paths[0], paths[1], 0, 1, {"area": False})
    want = match_features(eager[0], eager[1], z_a=0, z_b=1, config=MatchConfig(area=False))
    assert got["ok"] and got["downsample"] == 4  # the coarse fallback made the fit
    assert got == want.to_dict()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int64])
def test_reductions_of_a_slice_without_fill_equal_the_masked_ones(dtype):
    """A slice without an exact-zero pixel skips the fill masks (``has_zero``): its block
    means, fill shares and area copy are those of the masked computation, and one zero pixel
    makes it mask again."""
    from emflow.align.area import area_copy, has_zero
    from emflow.align.features import block_means

    rng = np.random.default_rng(5)
    img = rng.integers(1, 250, (301, 403)).astype(dtype)
    assert not has_zero(img) and not has_zero(img[:300, :400])
    for f in (1, 3):
        got = block_means(img, f)
        h, w = 301 // f * f, 403 // f * f
        means = img[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f).mean(axis=(1, 3))
        assert got.fill.dtype == np.uint8 and not got.fill.any()
        assert np.abs(got.means - means).max() <= (0.5 if f > 1 and dtype != np.float32 else 1e-3)
    copy, g = area_copy(img, 2)
    assert copy.min() >= 1  # no pixel is fill
    img[7, 9] = 0
    assert has_zero(img)
    assert block_means(img, 1).fill[7, 9] == 255 and block_means(img, 1).fill.sum() == 255
