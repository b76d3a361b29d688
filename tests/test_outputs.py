"""End to end: a synthetic stack → every output format, read back by two independent readers
and compared level by level with an in-memory reference pyramid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts

from emflow import recipe_from_dict, run
from emflow.pyramid import reference_pyramid
from emflow.testing import synthetic_slices, write_stack
from tests.conftest import psnr, read_pngs, tree_digest
from tests.readers import (
    precomputed_cloudvolume,
    precomputed_tensorstore,
    validate_ome_zarr,
    zarr_python,
    zarr_tensorstore,
)

ALL_OUTPUTS = [
    {"format": "precomputed", "name": "jpeg_sharded", "encoding": "jpeg", "sharded": True},
    {"format": "precomputed", "name": "raw_sharded", "encoding": "raw", "sharded": True},
    {"format": "precomputed", "name": "raw_plain", "encoding": "raw", "sharded": False},
    {"format": "omezarr", "name": "v05.ome.zarr", "version": "0.5"},
    {"format": "omezarr", "name": "v04.ome.zarr", "version": "0.4", "codec": "blosc-zstd"},
]


def _check_outputs(result, volume, outputs):
    levels = result.plan.levels
    ref = reference_pyramid(volume, levels)
    for o in outputs:
        path = result.output_paths[o["name"]]
        for k, lev in enumerate(levels):
            if o["format"] == "precomputed":
                a, b = precomputed_tensorstore(path, k), precomputed_cloudvolume(path, k)
            else:
                a, b = zarr_python(path, k), zarr_tensorstore(path, k)
            assert a.shape == lev.shape_zyx == ref[k].shape, (o["name"], k)
            np.testing.assert_array_equal(a, b, err_msg=f"{o['name']} level {k}: readers disagree")
            if o.get("encoding") == "jpeg":
                assert psnr(a, ref[k]) >= 30, (o["name"], k, psnr(a, ref[k]))
            else:
                np.testing.assert_array_equal(a, ref[k], err_msg=f"{o['name']} level {k}")
        if o["format"] == "omezarr":
            validate_ome_zarr(path)


@pytest.fixture(scope="module")
def odd_stack(tmp_path_factory):
    """1000 × 777 × 37: sizes that do not divide the 64³ chunk grid."""
    root = tmp_path_factory.mktemp("odd")
    paths = write_stack(synthetic_slices((37, 777, 1000), seed=3), root / "src")
    return root, read_pngs(paths)


@pytest.mark.integration
def test_odd_sizes_every_format_two_readers(odd_stack):
    root, volume = odd_stack
    recipe = recipe_from_dict(
        {
            "source": {"glob": str(root / "src" / "*.png")},
            "voxel_size_nm": [4, 4, 40],
            "align": False,
            "enhance": {"clip_limit": 0},
            "output_dir": str(root / "out"),
            "outputs": ALL_OUTPUTS,
        }
    )
    result = run(recipe)
    assert len(result.plan.levels) == 5  # until the coarsest level fits one 64³ chunk
    _check_outputs(result, volume, ALL_OUTPUTS)
    # chunk files under exact names, never name.gz
    assert not list(result.output_paths["raw_plain"].rglob("*.gz"))
    assert (result.output_paths["raw_plain"] / "4_4_40" / "0-64_0-64_0-37").is_file()
    assert (result.run_dir / "recipe.resolved.yaml").is_file()
    assert (result.run_dir / "COMPLETE").is_file()


@pytest.mark.integration
def test_slabs_and_coarse_passes_on_local_cluster_equal_serial(tmp_path):
    """Several slabs, a coarse pass from the hand-off copy, isotropic 2×2×2 levels; LocalCluster
    output is byte-identical to the serial run, and each slab owned whole shards."""
    from distributed import Client, LocalCluster

    shape = (100, 150, 130)
    paths = write_stack(synthetic_slices(shape, seed=5), tmp_path / "src")
    volume = read_pngs(paths)
    outputs = [
        {
            "format": "precomputed",
            "name": "jpeg",
            "encoding": "jpeg",
            "chunk_size_xyz": [32, 32, 32],
        },
        {"format": "precomputed", "name": "raw", "encoding": "raw", "chunk_size_xyz": [32, 32, 32]},
        {"format": "omezarr", "name": "z5", "chunk_size_xyz": [32, 32, 32]},
    ]

    def recipe(out):
        return recipe_from_dict(
            {
                "source": {"glob": str(tmp_path / "src" / "*.png")},
                "voxel_size_nm": [8, 8, 8],
                "align": False,
                "enhance": {"clip_limit": 0},
                "output_dir": str(tmp_path / out),
                "outputs": outputs,
                "run": {"slab_depth": 32},
            }
        )

    serial = run(recipe("serial"))
    p = serial.plan
    assert len(p.passes[0].blocks) == 4 and len(p.passes) >= 2
    _check_outputs(serial, volume, outputs)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        dist = run(recipe("dist"), client=client)
    for o in outputs:
        assert tree_digest(serial.output_paths[o["name"]]) == tree_digest(
            dist.output_paths[o["name"]]
        ), o
    # every unit's box covers whole storage objects (shards) of every level it writes
    for k, cell in enumerate(p.cells):
        store = ts.open(
            {
                "driver": "neuroglancer_precomputed",
                "kvstore": {"driver": "file", "path": str(serial.output_paths["raw"]) + "/"},
                "scale_index": k,
            }
        ).result()
        zs = ts.open(
            {
                "driver": "zarr3",
                "kvstore": {
                    "driver": "file",
                    "path": str(serial.output_paths["z5"] / str(k)) + "/",
                },
            }
        ).result()
        prec_zyx = store.chunk_layout.write_chunk.shape[2::-1]
        zarr_zyx = zs.chunk_layout.write_chunk.shape
        for a in range(3):
            if cell[a] is not None:
                assert cell[a] % prec_zyx[a] == 0 and cell[a] % zarr_zyx[a] == 0, (k, cell)


@pytest.mark.integration
def test_formats_place_voxels_at_same_physical_position(odd_stack, tmp_path):
    """Precomputed is corner-based, OME-Zarr centre-based: voxel centres must coincide at every level."""
    root, _ = odd_stack
    recipe = recipe_from_dict(
        {
            "source": {"glob": str(root / "src" / "*.png")},
            "voxel_size_nm": [4, 4, 40],
            "align": False,
            "enhance": {"clip_limit": 0},
            "output_dir": str(tmp_path / "out"),
            "outputs": [ALL_OUTPUTS[2], ALL_OUTPUTS[3]],
            "pyramid": {"levels": 3},
        }
    )
    result = run(recipe)
    info = json.loads((result.output_paths["raw_plain"] / "info").read_text())
    model = validate_ome_zarr(result.output_paths["v05.ome.zarr"])
    ms = (
        model.ome_attributes.multiscales[0]
        if hasattr(model, "ome_attributes")
        else model.attributes.ome.multiscales[0]
    )
    for k, scale in enumerate(info["scales"]):
        res_xyz = np.array(scale["resolution"], float)
        offset = np.array(scale["voxel_offset"], float)
        transforms = ms.datasets[k].coordinateTransformations
        zscale = np.array(transforms[0].scale, float)[::-1]
        ztrans = np.array(transforms[1].translation, float)[::-1]
        for i in (0, 1, 7):
            centre_precomputed = (offset + i + 0.5) * res_xyz
            centre_zarr = i * zscale + ztrans
            np.testing.assert_allclose(centre_precomputed, centre_zarr)
    assert len(info["scales"]) == 3
