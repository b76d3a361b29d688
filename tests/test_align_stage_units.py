"""What the alignment stage's worker units load: no recipe model (pydantic) on a worker, and
no SIFT data for a pair matched by area from a given estimate."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from emflow.align_stage import _load_features, features_unit, match_unit
from emflow.discover import SliceRef
from emflow.testing import synthetic_slices, write_stack

CONFIG = {"model": "auto", "model_corner_threshold_px": 1.0, "ratio": 0.75, "area": True}


def test_unpickling_the_units_module_imports_no_recipe_model():
    code = (
        "import sys, json, emflow.align_stage\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'"
        " or m == 'emflow.recipe')))"
    )
    assert _printed_json(code) == []


def test_scipy_is_imported_by_the_driver_thread_not_by_the_units_module():
    """Workers unpickle emflow.align_stage without SciPy (~0.4 CPU-s); the driver imports it
    for the solve in a thread (``_import_solver``) while the workers match."""
    code = (
        "import sys, json, emflow.align_stage as s\n"
        "before = 'scipy.sparse.linalg' in sys.modules\n"
        "s._import_solver()\n"
        "print(json.dumps([before, 'scipy.sparse.linalg' in sys.modules]))"
    )
    assert _printed_json(code) == [False, True]


def _printed_json(code: str) -> object:
    """What ``code`` prints as JSON when run in a fresh interpreter (nothing imported yet)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def _features(tmp_path: Path) -> list[str]:
    files = write_stack(synthetic_slices((3, 384, 384), seed=7), tmp_path / "src")
    paths = []
    for z, src in enumerate(files):
        paths.append(str(tmp_path / f"z{z}.npz"))
        features_unit(SliceRef(z, z, str(src), 0), (384, 384), None, 2000, paths[-1])
    return paths


def _without_sift(path: str, out: Path) -> str:
    """The same features file without keypoints, descriptors and coarse copy."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith(("keypoints", "descriptors", "coarse")):
                dst.writestr(info, src.read(info))
    return str(out)


def test_a_pair_from_a_given_estimate_reads_no_sift_data(tmp_path):
    paths = _features(tmp_path)
    first = match_unit(paths[0], paths[1], 0, 1, CONFIG)
    second = match_unit(paths[1], paths[2], 1, 2, CONFIG)
    assert first["ok"] and second["ok"]
    m = np.vstack([first["matrix"], [0, 0, 1]]) @ np.vstack([second["matrix"], [0, 0, 1]])
    want = match_unit(paths[0], paths[2], 0, 2, CONFIG, m[:2].tolist())
    assert want["ok"] and want["method"] == "area+"
    # the same result from files without any SIFT data: none of it was read
    bare = [_without_sift(p, tmp_path / f"bare{i}.npz") for i, p in enumerate(paths)]
    got = match_unit(bare[0], bare[2], 0, 2, CONFIG, m[:2].tolist())
    assert got == want
    f = _load_features(paths[0], sift=False)
    assert len(f) == 0 and f.area is not None and f.downsample == _load_features(paths[0]).downsample
    # without area matching SIFT is needed: everything is read
    assert len(_load_features(paths[0])) > 20
    with np.load(io.BytesIO(Path(paths[0]).read_bytes())) as d:
        assert "descriptors" in d


def test_saved_descriptors_are_bytes_and_read_back_as_computed(tmp_path):
    """OpenCV's float32 SIFT descriptors are whole numbers 0..255: the features file keeps them
    as uint8 (0.5 of 2.5 MB for 4000 keypoints) and matching gets the same float32 values, so a
    pair matched from the files equals one matched from the features in memory; a descriptor
    that is not a byte (another SIFT, an older file) is kept as float32."""
    import cv2

    from emflow.align.features import compute_features
    from emflow.align.match import MatchConfig, match_features
    from emflow.align_stage import saved_descriptors
    from emflow.io.readers import read_image

    paths = _features(tmp_path)
    src = sorted((tmp_path / "src").iterdir())
    cv2.setNumThreads(1)
    mem = [compute_features(read_image(str(p), 0), nfeatures=2000) for p in src[:2]]
    for p, m in zip(paths, mem):
        with np.load(p) as d:
            assert d["descriptors"].dtype == np.uint8
        f = _load_features(p)
        assert f.descriptors.dtype == np.float32
        assert f.descriptors.tobytes() == m.descriptors.tobytes()
    cfg = MatchConfig(**{k: v for k, v in CONFIG.items() if k != "area"}, area=False)
    want = match_features(mem[0], mem[1], z_a=0, z_b=1, config=cfg).to_dict()
    got = match_unit(paths[0], paths[1], 0, 1, {**CONFIG, "area": False})
    assert got["ok"] and got == want
    # not bytes: kept as they are
    for odd in (np.full((4, 128), 0.5, np.float32), np.full((4, 128), 256.0, np.float32)):
        assert saved_descriptors(odd) is odd
    nan = np.zeros((4, 128), np.float32)
    nan[1, 2] = np.nan
    assert saved_descriptors(nan).dtype == np.float32
    # an older run folder's float32 file reads back the same
    old = tmp_path / "old.npz"
    with np.load(paths[0]) as d:
        arrays = {k: d[k] for k in d.files}
    np.savez(old, **{**arrays, "descriptors": arrays["descriptors"].astype(np.float32)})
    as_read = _load_features(str(old)).descriptors
    assert as_read.tobytes() == _load_features(paths[0]).descriptors.tobytes()
