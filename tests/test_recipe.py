"""Recipe validation: defaults, unknown keys, field paths in errors, fingerprints."""

from __future__ import annotations

import pytest

from emflow.errors import RecipeError
from emflow.recipe import load_recipe, recipe_from_dict

BASE = {
    "source": {"pattern": "img%05d.png", "z_start": 0, "z_stop": 10},
    "voxel_size_nm": [4, 4, 40],
    "output_dir": "out",
    "outputs": [{"format": "precomputed"}],
}


def with_(**kw):
    return {**BASE, **kw}


def test_defaults_are_filled_in():
    r = recipe_from_dict(BASE)
    out = r.outputs[0]
    assert (out.encoding, out.jpeg_quality, out.sharded, out.chunk_size_xyz) == (
        "jpeg",
        90,
        True,
        (64, 64, 64),
    )
    assert r.align.enabled is True and r.depth.output == "uint8" and r.pyramid.levels is None
    assert "jpeg_quality: 90" in r.to_yaml()


@pytest.mark.parametrize(
    "data,field",
    [
        (with_(colour="red"), "colour"),
        (with_(outputs=[{"format": "precomputed", "encodng": "raw"}]), "encodng"),
        (with_(outputs=[{"format": "n5"}]), "outputs.0"),
        (with_(outputs=[]), "outputs"),
        (with_(voxel_size_nm=[4, 4]), "voxel_size_nm"),
        (with_(voxel_size_nm=[4, 4, -1]), "voxel_size_nm.2"),
        (with_(source={"pattern": "img.png", "z_start": 0, "z_stop": 3}), "source"),
        (with_(source={"pattern": "img%d.png", "z_start": 5, "z_stop": 3}), "source"),
        (with_(source={"glob": "*.png", "directory": "x"}), "source"),
        (
            with_(
                outputs=[{"format": "omezarr", "version": "0.4", "shard_size_xyz": [128, 128, 128]}]
            ),
            "outputs.0",
        ),
        (with_(depth={"window": [100, 10]}), "depth.window"),
        (with_(outputs=[{"format": "precomputed"}, {"format": "precomputed"}]), "recipe"),
    ],
)
def test_bad_recipes_name_the_field(data, field):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert f"'{field}" in str(err.value) or field in str(err.value)


def test_align_false_is_identity_and_fingerprint_ignores_resources():
    a = recipe_from_dict(with_(align=False, run={"workers": 2}))
    b = recipe_from_dict(with_(align=False, run={"workers": 8, "memory_per_worker": "2GiB"}))
    assert a.align.enabled is False
    assert a.output_fingerprint() == b.output_fingerprint()
    c = recipe_from_dict(with_(outputs=[{"format": "precomputed", "jpeg_quality": 80}]))
    assert c.output_fingerprint() != a.output_fingerprint()


def test_paths_resolve_from_the_recipe_directory(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "source: {glob: 'raw/*.png'}\nvoxel_size_nm: [1, 1, 1]\noutput_dir: out\noutputs: [{format: omezarr}]\n"
    )
    r = load_recipe(tmp_path / "r.yaml")
    assert r.output_path == tmp_path / "out"
