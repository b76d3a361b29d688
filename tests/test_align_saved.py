"""The per-process caches of the alignment units: saved features files (emflow.align.saved) and
prepared area copies (emflow.align.area._prepared). Neither may ever hand out stale data:
a file rewritten between two reads is read again (same size, same timestamps, same inode
too), an array changed in place is prepared again; both stay within their byte bounds, and
the pair and QC units give the same results from cold and warm caches."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from emflow.align import area, saved
from emflow.align_stage import _load_area, content_unit, features_unit, match_unit
from emflow.discover import SliceRef
from emflow.io.location import put_bytes
from emflow.testing import synthetic_slices, write_stack

CONFIG = {"model": "auto", "model_corner_threshold_px": 1.0, "ratio": 0.75, "area": True}


@pytest.fixture(autouse=True)
def _cold() -> None:
    saved.forget()
    area._PREPARED.clear()


def _npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    put_bytes(str(path), buf.getvalue())  # as a features unit writes: temporary file + rename


def _everything(names: frozenset[str]) -> frozenset[str]:
    return names


def test_an_unchanged_file_is_read_once_and_its_arrays_are_read_only(tmp_path):
    p = tmp_path / "z0.npz"
    _npz(p, area=np.arange(64, dtype=np.uint8).reshape(8, 8), area_factor=np.array(4))
    first = saved.read_arrays(str(p), _everything)
    again = saved.read_arrays(str(p), _everything)
    assert again["area"] is first["area"]  # kept, not read again
    assert int(again["area_factor"]) == 4 and again["area"][7, 7] == 63
    assert not first["area"].flags.writeable
    with pytest.raises(ValueError):
        first["area"][0, 0] = 1
    assert saved.kept_bytes() == 64 + 8


def test_a_rewritten_file_is_read_again_whatever_its_timestamps_and_inode(tmp_path):
    p = tmp_path / "z0.npz"
    _npz(p, descriptors=np.zeros((16, 128), np.float32))
    st = os.stat(p)
    assert not saved.read_arrays(str(p), _everything)["descriptors"].any()
    # 1. replaced (new inode), same size, the old file's timestamps set back on it
    _npz(p, descriptors=np.ones((16, 128), np.float32))
    assert os.stat(p).st_size == st.st_size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (saved.read_arrays(str(p), _everything)["descriptors"] == 1).all()
    # 2. rewritten in place (same inode), same size and timestamps
    st = os.stat(p)
    buf = io.BytesIO()
    np.savez(buf, descriptors=np.full((16, 128), 2, np.float32))
    with open(p, "r+b") as fh:
        fh.write(buf.getvalue())
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_ino == st.st_ino and os.stat(p).st_size == st.st_size
    assert (saved.read_arrays(str(p), _everything)["descriptors"] == 2).all()


def test_what_a_caller_wants_is_read_and_the_rest_later(tmp_path):
    p = tmp_path / "z0.npz"
    _npz(p, area=np.ones((4, 4), np.uint8), thumb=np.zeros((2, 2), np.uint8))
    assert set(saved.read_arrays(str(p), lambda names: ("area", "nothing"))) == {"area"}
    assert saved.kept_bytes() == 16
    both = saved.read_arrays(str(p), lambda names: ("area", "thumb"))
    assert set(both) == {"area", "thumb"} and saved.kept_bytes() == 20
    # not kept: the cache does not grow
    q = tmp_path / "z1.npz"
    _npz(q, area=np.ones((4, 4), np.uint8))
    assert saved.read_arrays(str(q), _everything, keep=False)["area"].sum() == 16
    assert saved.kept_bytes() == 20
    with pytest.raises(FileNotFoundError, match="features .*z2.npz are missing"):
        saved.read_arrays(str(tmp_path / "z2.npz"), _everything)


def test_the_cache_keeps_the_files_used_last_within_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(saved, "KEEP_BYTES", 3 * 1000)
    paths = []
    for z in range(8):
        paths.append(str(tmp_path / f"z{z}.npz"))
        _npz(Path(paths[-1]), area=np.full(1000, z, np.uint8))
    got = [saved.read_arrays(p, _everything)["area"] for p in paths]
    assert saved.kept_bytes() == 3000
    saved.read_arrays(paths[5], _everything)  # now the most recently used: z6 goes next
    _npz(Path(tmp_path / "z8.npz"), area=np.full(1000, 8, np.uint8))
    saved.read_arrays(str(tmp_path / "z8.npz"), _everything)
    assert saved.read_arrays(paths[5], _everything)["area"] is got[5]
    assert saved.read_arrays(paths[7], _everything)["area"] is got[7]
    assert saved.read_arrays(paths[6], _everything)["area"] is not got[6]  # read again
    assert saved.kept_bytes() <= 3000
    # a file larger than the bound is read but not kept
    big = tmp_path / "big.npz"
    _npz(big, area=np.zeros(4000, np.uint8))
    assert saved.read_arrays(str(big), _everything)["area"].size == 4000
    assert saved.kept_bytes() <= 3000


def test_a_file_at_a_url_is_read_at_each_call_and_not_kept(tmp_path):
    from tests.storage_servers import HttpServer

    _npz(tmp_path / "z0.npz", area=np.full((4, 4), 3, np.uint8))
    server = HttpServer(tmp_path)
    try:
        url = f"{server.url}/z0.npz"
        got = saved.read_arrays(url, _everything)
        assert (got["area"] == 3).all() and not got["area"].flags.writeable
        assert saved.kept_bytes() == 0
        _npz(tmp_path / "z0.npz", area=np.full((4, 4), 5, np.uint8))
        assert (saved.read_arrays(url, _everything)["area"] == 5).all()
        with pytest.raises(FileNotFoundError, match="are missing"):
            saved.read_arrays(f"{server.url}/none.npz", _everything)
    finally:
        server.close()


def test_a_prepared_area_copy_is_reused_only_for_equal_content(monkeypatch):
    rng = np.random.default_rng(3)
    a = rng.integers(1, 255, (96, 80), dtype=np.uint8)
    a[:10, :10] = 0  # fill: the mask is eroded
    img, valid = area._prepared(a, 1.0)
    want_img, want_valid = area._prepare(a, 1.0)
    assert np.array_equal(img, want_img) and np.array_equal(valid, want_valid)
    assert not img.flags.writeable and not valid.flags.writeable
    same = area._prepared(a.copy(), 1.0)  # equal content, another array: the kept result
    assert same[0] is img and same[1] is valid
    assert area._prepared(a, 2.0)[0] is not img  # another blur
    a[50, 40] ^= 0x55  # changed in place: prepared again, not the kept result
    changed, _ = area._prepared(a, 1.0)
    assert changed is not img and np.array_equal(changed, area._prepare(a, 1.0)[0])
    assert not np.array_equal(changed, img)
    # within the bound: the least recently used go first
    monkeypatch.setattr(area, "_PREPARED_KEEP_BYTES", 3 * 6 * a.size)
    for k in range(5):
        area._prepared(np.full((96, 80), k + 1, np.uint8), 1.0)
    assert len(area._PREPARED) == 3
    assert sum(sum(x.nbytes for x in e) for e in area._PREPARED.values()) <= 3 * 6 * a.size


def _features(tmp_path: Path, n: int = 4) -> list[str]:
    files = write_stack(synthetic_slices((n, 384, 384), seed=11), tmp_path / "src")
    paths = []
    for z, src in enumerate(files):
        paths.append(str(tmp_path / f"z{z}.npz"))
        features_unit(SliceRef(z, z, str(src), 0), (384, 384), None, 2000, paths[-1])
    return paths


def _units(paths: list[str]) -> list:
    out = [match_unit(paths[z], paths[z + 1], z, z + 1, CONFIG) for z in range(len(paths) - 1)]
    m = np.vstack([out[0]["matrix"], [0, 0, 1]]) @ np.vstack([out[1]["matrix"], [0, 0, 1]])
    out.append(match_unit(paths[0], paths[2], 0, 2, CONFIG, m[:2].tolist(), True))
    out.append(match_unit(paths[1], paths[3], 1, 3, CONFIG, m[:2].tolist()))
    out += [content_unit(paths[z], paths[z + 1], out[z]["matrix"]) for z in range(3)]
    return out


def test_pair_and_qc_units_give_the_same_results_from_cold_and_warm_caches(tmp_path):
    paths = _features(tmp_path)
    cold = _units(paths)
    assert saved.kept_bytes() > 0 and len(area._PREPARED) > 0
    warm = _units(paths)  # every read and preparation now from the caches
    assert repr(warm) == repr(cold)  # the same floats (repr: NaN equals NaN)
    assert all(r["ok"] for r in cold[:5]) and all(r["patches"] > 0 for r in cold[5:])


def test_a_features_file_rewritten_between_units_is_read_again(tmp_path):
    """A rerun that rewrites slice 1's features (here: with slice 2's) while the worker's
    cache holds the old ones: the next pair reads the new file."""
    paths = _features(tmp_path, 3)
    before = match_unit(paths[0], paths[1], 0, 1, CONFIG)
    area_before, _ = _load_area(paths[1])
    put_bytes(paths[1], Path(paths[2]).read_bytes())
    after = match_unit(paths[0], paths[1], 0, 1, CONFIG)
    saved.forget()
    area._PREPARED.clear()
    assert after == match_unit(paths[0], paths[2], 0, 1, CONFIG) != before
    assert np.array_equal(_load_area(paths[1])[0], _load_area(paths[2])[0])
    assert not np.array_equal(_load_area(paths[1])[0], area_before)
