"""Alignment inside the pipeline: a synthetic EM stack misaligned by known affines, aligned back by
`emflow run` (features → match → solve → warp), QC written, and re-export with alignment.json.
(Accuracy on real EM texture is measured on the pure functions in tests/test_align_*.py.)"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from emflow import recipe_from_dict, run
from emflow.align.solve import Alignment
from emflow.align.warp import warp_slice
from emflow.align_stage import crop_line
from emflow.testing import synthetic_stack, write_stack
from emflow.testing.transforms import (
    apply_to_stack,
    insert_bad_slices,
    random_affines,
    stack_errors_px,
)
from tests.conftest import tree_digest
from tests.readers import precomputed_tensorstore, zarr_python

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory):
    """20 synthetic slices (512²), each distorted by a known affine; slice 7 blanked."""
    stack = synthetic_stack((20, 512, 512), seed=8)
    distort = random_affines(
        20,
        max_translation_px=40,
        max_rotation_deg=2,
        max_scale_shear=0.01,
        seed=21,
        shape_yx=stack.shape[1:],
    )
    warped, truth = apply_to_stack(stack, distort)
    warped = insert_bad_slices(warped, {7: "blank"})
    root = tmp_path_factory.mktemp("align")
    write_stack(warped, root / "src", pattern="s%03d.png")
    return root, warped, truth


def _recipe(root, out, clip_limit=0.0, **extra):
    return recipe_from_dict(
        {
            "source": {"glob": str(root / "src" / "*.png")},
            "voxel_size_nm": [4, 4, 50],
            "enhance": {"clip_limit": clip_limit},
            "output_dir": str(root / out),
            "outputs": [
                {"format": "omezarr", "name": "z"},
                {"format": "precomputed", "name": "p", "encoding": "raw"},
            ],
            **extra,
            "align": {"enabled": True, **extra.get("align", {})},
        }
    )


def test_pipeline_recovers_known_transforms_and_writes_warped_slices(misaligned):
    root, warped, truth = misaligned
    said: list[str] = []
    # a synthetic truth holds up to one global transform; trend removal (the default) fixes
    # the low frequencies by the slices' footprints, which slices clipped to their shape do
    # not show: this test measures the solve itself (tests/test_align_trend.py the trend)
    result = run(_recipe(root, "out", align={"detrend": "none"}), log=said.append)
    alignment = Alignment.from_json(result.run_dir / "alignment.json")
    assert 7 in alignment.bad_slices
    # the console line counts pairs as the alignment does: matched / failed / rejected disjoint
    summary = alignment.pair_summary()
    assert summary == result.alignment.pair_summary() == result.pair_summary
    line = next(m for m in said if m.startswith("pairs: "))
    shown = {
        kind: tuple(int(v) for v in m.groups())
        for kind, m in (
            (kind, re.search(rf"{name} (\d+)/(\d+) matched \((\d+) failed, (\d+) rejected\)", line))
            for kind, name in (("neighbour", "neighbours"), ("second", "second neighbours"))
        )
    }
    for kind, (matched, total, failed, rejected) in shown.items():
        c = summary[kind]
        assert (matched, failed, rejected) == (c["matched"], c["failed"], c["rejected"]), line
        assert total == matched + failed + rejected
    assert summary["neighbour"]["failed"] == 2  # the two pairs touching the blank slice
    # 2 of 19 neighbour pairs failed (> 10 %): a warning names them
    warning = next(m for m in said if m.startswith("warning: 2 of 19 neighbour pairs failed"))
    assert "z6→z7" in warning and "z7→z8" in warning, warning
    # the recipe's drift control reached the solve (default align.regularisation)
    assert alignment.regularisation == _recipe(root, "out").align.regularisation == 0.03
    assert alignment.detrend == "none" and _recipe(root, "out").align.detrend == "rigid"
    # the default frame (align.frame: slice) keeps the slice size; what it crops is said
    assert alignment.frame == "slice" and alignment.frame_shape_yx == warped.shape[1:]
    z_max = max(alignment.cropped, key=lambda z: alignment.cropped[z])
    crop = next(m for m in said if "the frame crops" in m)
    assert f"crops {len(alignment.cropped)} slice" in crop, crop
    assert f"{100 * alignment.cropped[z_max]:.1f} % of z{z_max}" in crop, crop
    # a slice losing more than 5 % of its content makes it a warning naming such slices
    over = [z for z in sorted(alignment.cropped) if alignment.cropped[z] > 0.05]
    assert crop.startswith("warning: " if over else "alignment: "), crop
    assert all(f"z{z}" in crop for z in over[:10]), crop
    lines = crop_line({1: 0.004, 5: 0.061, 9: 0.052}), crop_line({2: 0.03})
    assert lines[0].startswith("warning: the frame crops 3 slices' edges, at most 6.1 % of z5")
    assert "(2 over 5 %: z5, z9)" in lines[0] and "align.frame: union" in lines[0]
    assert lines[1].startswith("alignment: the frame crops 1 slice's edges, at most 3.0 % of z2;")
    good = {z: m for z, m in alignment.transforms.items() if z != 7}
    errors = stack_errors_px(good, truth, warped.shape[1:])
    assert max(errors.values()) <= 3.0, errors  # drift bound on synthetic texture; see closing note
    # the written volume is each source slice warped into the global frame
    level0 = zarr_python(result.output_paths["z"], 0)
    assert level0.shape == (20, *alignment.frame_shape_yx)
    for z in (0, 11, 19):
        expected = warp_slice(warped[z], alignment.transforms[z], (0, 0), alignment.frame_shape_yx)
        np.testing.assert_array_equal(level0[z], expected)
    np.testing.assert_array_equal(precomputed_tensorstore(result.output_paths["p"], 0), level0)
    # QC artefacts
    qc = result.run_dir / "qc"
    for name in ("pairs.csv", "pairs.png", "reslices.png"):
        assert (qc / name).stat().st_size > 0, name
    # every fitted link measured against the content after alignment (patch NCC residual): on
    # synthetic texture it stays within the stack's error bound, and is never exactly 0
    with (qc / "pairs.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["content_px"] not in ("", "nan")]
    fitted = sum(summary[k]["matched"] + summary[k]["rejected"] for k in summary)
    assert len(rows) == fitted, rows  # rejected links are measured too: that is their QC
    residual = [float(r["content_px"]) for r in rows]
    assert 0 < min(residual) and max(residual) < 3.0, residual  # the stack's drift bound
    assert any(m.startswith("links after alignment (patch NCC residual") for m in said)
    assert "features" in result.stage_seconds and not (result.run_dir / "slice-cache").exists()
    # the complete run again: every stage skipped (features were tidied away), same alignment
    # and outputs, QC kept
    assert not (result.run_dir / "features").exists()
    digest = tree_digest(result.output_paths["z"])
    table = (qc / "pairs.csv").read_text()
    again = run(_recipe(root, "out", align={"detrend": "none"}))
    assert Alignment.from_json(again.run_dir / "alignment.json") == alignment
    assert again.alignment.pair_summary() == summary
    assert tree_digest(again.output_paths["z"]) == digest
    assert (qc / "pairs.csv").read_text() == table and (qc / "reslices.png").stat().st_size > 0


def test_reexport_with_alignment_json_is_byte_identical_without_features(misaligned):
    root, _, _ = misaligned
    first = run(_recipe(root, "a", clip_limit=0.02))
    again = run(_recipe(root, "b", clip_limit=0.02), alignment=first.run_dir / "alignment.json")
    assert "features" not in again.stage_seconds and "match" not in again.stage_seconds
    for name in ("z", "p"):
        assert tree_digest(first.output_paths[name]) == tree_digest(again.output_paths[name])
    # and the file itself round-trips
    data = json.loads((first.run_dir / "alignment.json").read_text())
    assert Alignment.from_dict(data) == Alignment.from_json(first.run_dir / "alignment.json")


def test_stack_that_cannot_be_aligned_says_how_its_pairs_failed(tmp_path):
    """Unrelated noise slices: the error names the typical pair failure and the way out."""
    from emflow.errors import AlignmentError

    rng = np.random.default_rng(0)
    noise = rng.integers(1, 256, (4, 300, 300), dtype=np.uint8)
    write_stack(noise, tmp_path / "src", pattern="s%03d.png")
    recipe = recipe_from_dict(
        {
            "source": {"glob": str(tmp_path / "src" / "*.png")},
            "voxel_size_nm": [4, 4, 40],
            "output_dir": str(tmp_path / "out"),
            "outputs": [{"format": "omezarr"}],
            "align": {"enabled": True},
        }
    )
    with pytest.raises(AlignmentError) as err:
        run(recipe)
    message = str(err.value)
    assert "no slice could be aligned" in message and "align: false" in message
    assert "3 of 3 pairs failed, 3 of them like z0→z1" in message, message
    assert "featureless/noise" in message
    assert not (tmp_path / "out" / "omezarr").exists()  # nothing left looking complete
    # the reasons are on disk for inspection although the run stopped
    table = (tmp_path / "out" / "emflow-run" / "qc" / "pairs.csv").read_text()
    assert (
        table.count("slice 0 is unusable") == 1
        and (tmp_path / "out" / "emflow-run" / "qc" / "pairs.png").exists()
    )
