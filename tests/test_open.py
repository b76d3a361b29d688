"""emflow.open: every output format reads back as a lazy (z, y, x) array in nm, locally and
over HTTP, equal to an in-memory reference pyramid; bad sources get one clear error."""

from __future__ import annotations

import shutil
import threading

import dask.array as da
import numpy as np
import pytest

import emflow
from emflow.errors import OutputError
from emflow.pyramid import reference_pyramid
from emflow.testing import synthetic_slices, write_stack
from emflow.volume import TARGET_CHUNK_BYTES, grown_chunks
from tests.conftest import psnr, read_pngs

OUTPUTS = [
    {"format": "precomputed", "name": "raw", "encoding": "raw", "sharded": True},
    {"format": "precomputed", "name": "jpeg", "encoding": "jpeg", "sharded": False},
    {"format": "omezarr", "name": "v05.ome.zarr", "version": "0.5"},
    {"format": "omezarr", "name": "v04.ome.zarr", "version": "0.4"},
]
VOXEL_XYZ = (4.0, 5.0, 40.0)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("open")
    paths = write_stack(synthetic_slices((18, 150, 230), seed=4), root / "src")
    result = emflow.run(
        {
            "source": {"glob": str(root / "src" / "*.png")},
            "voxel_size_nm": list(VOXEL_XYZ),
            "align": False,  # level 0 = the slices, exactly
            "enhance": {"clip_limit": 0},
            "output_dir": str(root / "out"),
            "outputs": OUTPUTS,
        },
        progress=False,
    )
    return result, read_pngs(paths)


def test_every_format_and_level_reads_back_with_physical_coordinates(ran):
    result, volume = ran
    levels = result.plan.levels
    ref = reference_pyramid(volume, levels)
    for o in OUTPUTS:
        for k, lev in enumerate(levels):
            arr = emflow.open(result, level=k, output=o["name"])
            assert isinstance(arr.data, da.Array)  # lazy
            assert arr.dims == ("z", "y", "x") and arr.shape == lev.shape_zyx, (o, k)
            assert arr.attrs["level"] == k and arr.attrs["levels"] == len(levels)
            assert arr.attrs["voxel_size_nm"] == pytest.approx(lev.voxel_size_nm_zyx)
            for axis, dim in enumerate("zyx"):  # voxel centres: (i + 0.5) × voxel size, in nm
                step = lev.voxel_size_nm_zyx[axis]
                want = (np.arange(lev.shape_zyx[axis]) + 0.5) * step
                np.testing.assert_allclose(arr[dim].values, want, rtol=1e-12)
                assert arr[dim].attrs["units"] == "nm"
            values = arr.values
            if o.get("encoding") == "jpeg":
                assert psnr(values, ref[k]) > 30, (o["name"], k)
            else:
                np.testing.assert_array_equal(values, ref[k], err_msg=f"{o['name']} level {k}")


def test_partial_reads_and_ways_to_name_a_volume(ran):
    result, volume = ran
    out_dir = result.output_paths["raw"].parent
    window = np.s_[3:9, 17:101, 40:211]
    for source, output in [
        (result, None),  # the first output of the run
        (result, "raw"),
        (out_dir, None),  # an output_dir: the first output the recipe lists
        (str(out_dir), "raw"),
        (result.output_paths["raw"], None),  # the volume itself
        (f"file://{result.output_paths['raw']}", None),
    ]:
        arr = emflow.open(source, output=output)
        assert arr.attrs["format"] == "precomputed" and arr.name == "raw"
        np.testing.assert_array_equal(arr[window].values, volume[window])
    # label-based selection in nm
    arr = emflow.open(result, output="v05.ome.zarr")
    picked = arr.sel(z=40 * 7 + 20, method="nearest")
    np.testing.assert_array_equal(picked.values, volume[7])
    assert emflow.open(result, level=-1).attrs["level"] == len(result.plan.levels) - 1


def test_reads_over_http(ran):
    """A remote location (here emflow serve's HTTP server) reads like the local folder."""
    from emflow.cli.serve import make_server

    result, volume = ran
    out_dir = result.output_paths["raw"].parent
    server = make_server(out_dir, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("raw", "v05.ome.zarr", "v04.ome.zarr"):
            remote = emflow.open(base, output=name)
            assert remote.attrs["source"] == f"{base}/{name}"
            np.testing.assert_array_equal(remote[5:8].values, volume[5:8], err_msg=name)
        level1 = emflow.open(f"{base}/raw", level=1)
        np.testing.assert_array_equal(level1.values, emflow.open(result, level=1).values)
        with pytest.raises(OutputError, match="not a neuroglancer precomputed volume"):
            emflow.open(f"{base}/nothing-here")
    finally:
        server.shutdown()
        server.server_close()


def test_bad_sources_say_what_to_give(ran, tmp_path):
    result, _ = ran
    with pytest.raises(OutputError, match=r"output='nope'.*raw, jpeg, v05.ome.zarr, v04.ome.zarr"):
        emflow.open(result, output="nope")
    with pytest.raises(OutputError, match=r"level=9: .* has levels 0\.\.\d"):
        emflow.open(result, level=9)
    with pytest.raises(OutputError, match="no such folder"):
        emflow.open(tmp_path / "missing")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    with pytest.raises(OutputError, match=r"it holds: a\.txt"):
        emflow.open(tmp_path / "stuff")
    with pytest.raises(OutputError, match="unknown storage scheme 'ftp'"):
        emflow.open("ftp://host/volume")
    with pytest.raises(TypeError, match="RunResult, a path or a URL"):
        emflow.open(42)
    # an unfinished run: only <name>.partial exists / an OME-Zarr group without multiscales
    partial = tmp_path / "em.partial"
    shutil.copytree(result.output_paths["v05.ome.zarr"], partial)
    with pytest.raises(OutputError, match=r"only em\.partial exists: its run has not finished"):
        emflow.open(tmp_path / "em")
    (partial / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(OutputError, match="not a complete OME-Zarr image"):
        emflow.open(partial)


def test_dask_chunks_are_whole_storage_chunks_grown_to_the_target():
    assert grown_chunks((64, 64, 64), (20, 1075, 1027), 1) == (20, 1024, 1024)
    big = grown_chunks((64, 64, 64), (5000, 40000, 40000), 1)
    assert big == (64, 512, 1024) and np.prod(big) <= TARGET_CHUNK_BYTES
    assert grown_chunks((1, 64, 64), (3, 100, 90), 2) == (3, 100, 90)
