"""Running a finished recipe again is a no-op; a changed recipe refuses; --restart redoes it."""

from __future__ import annotations

import json

import pytest

from emflow import recipe_from_dict, run
from emflow.errors import OutputError
from emflow.testing import synthetic_slices, write_stack
from tests.conftest import tree_digest


def _recipe(tmp_path, quality=90):
    return recipe_from_dict(
        {
            "source": {"glob": str(tmp_path / "src" / "*.png")},
            "voxel_size_nm": [4, 4, 40],
            "align": False,
            "output_dir": str(tmp_path / "out"),
            "outputs": [
                {"format": "precomputed", "name": "p", "jpeg_quality": quality},
                {"format": "omezarr", "name": "z"},
            ],
            "run": {"slab_depth": 64},
        }
    )


def test_rerun_skips_everything_and_restart_redoes(tmp_path):
    write_stack(synthetic_slices((70, 64, 96), seed=2), tmp_path / "src")
    first = run(_recipe(tmp_path))
    digest = {n: tree_digest(p) for n, p in first.output_paths.items()}
    journal = (first.run_dir / "journal.jsonl").read_text()
    again = run(_recipe(tmp_path))
    assert {n: tree_digest(p) for n, p in again.output_paths.items()} == digest
    added = [
        json.loads(line)
        for line in (again.run_dir / "journal.jsonl").read_text()[len(journal) :].splitlines()
    ]
    assert not [e for e in added if e["event"] == "done"]
    skipped = {e["stage"]: len(e["indices"]) for e in added if e["event"] == "skipped"}
    assert skipped == {"slab": 2, "coarse1": 1, "finalize": 2}
    assert (again.run_dir / "COMPLETE").is_file()
    with pytest.raises(OutputError, match="--restart"):
        run(_recipe(tmp_path, quality=80))
    redone = run(_recipe(tmp_path, quality=80), restart=True)
    assert tree_digest(redone.output_paths["z"]) == digest["z"]
    assert tree_digest(redone.output_paths["p"]) != digest["p"]
    assert not list((tmp_path / "out").glob("*.partial"))
