"""Real neighbouring ssTEM sections (not synthetic copies) through `emflow run` at default settings.

The VNC stack is published pre-aligned, so after distorting each section by a known affine the
recovered section-to-section transforms must undo the distortion. Real sections differ (oblique
membranes move a few px per 45 nm section), so the published alignment is a reference, not px-exact
truth: neighbours agree with it to within ~4-18 px at the corners, while the distortions move them
by 13-110 px. (Accumulated over many sections this content-driven offset drifts: the closing note of
issue 3 reports it; px-level truth tests use synthetic content in test_align_*.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emflow import recipe_from_dict, run
from emflow.align.match import match
from emflow.align.solve import Alignment
from emflow.testing import write_stack
from emflow.testing.transforms import (
    apply_to_stack,
    corner_error_px,
    random_affines,
    stack_errors_px,
)

pytestmark = [pytest.mark.real_data, pytest.mark.integration]


def test_real_vnc_neighbours_need_the_coarse_fallback(shared_data):
    """At the working scale (1024²) real 45 nm neighbours share too few SIFT features; 4x coarser match."""
    src = shared_data / "sstem-drosophila-vnc" / "stack1" / "raw"
    a, b = (tifffile.imread(src / f"{z:02d}.tif") for z in (3, 4))
    fine_only = match(a, b, coarse_fallback=False)
    assert not fine_only.ok and fine_only.inliers < 20 and fine_only.downsample == 1
    p = match(a, b)
    assert p.ok and p.downsample == 4 and p.inliers >= 20, p
    # the published stack is aligned: the recovered pair is near identity (real content change
    # between sections leaves a few px, see the module docstring)
    assert corner_error_px(p.matrix_array, np.eye(2, 3), a.shape) < 15
    assert "at 4x" in match(a, np.zeros_like(b)).reason  # both scales are reported on failure


def test_real_vnc_neighbours_align_at_default_settings(shared_data, tmp_path):
    src = shared_data / "sstem-drosophila-vnc" / "stack1" / "raw"
    stack = np.stack([tifffile.imread(src / f"{z:02d}.tif") for z in range(12)])
    distort = random_affines(
        12,
        max_translation_px=60,
        max_rotation_deg=2,
        max_scale_shear=0.01,
        seed=5,
        shape_yx=stack.shape[1:],
    )
    warped, truth = apply_to_stack(stack, distort)
    write_stack(warped, tmp_path / "src", pattern="s%03d.tif")
    before = max(
        stack_errors_px({z: np.eye(2, 3) for z in range(12)}, truth, stack.shape[1:]).values()
    )
    result = run(
        recipe_from_dict(
            {
                "source": {"glob": str(tmp_path / "src" / "*.tif")},
                "voxel_size_nm": [4.6, 4.6, 45],
                "output_dir": str(tmp_path / "out"),
                "outputs": [{"format": "omezarr"}],
                "align": {"enabled": True, "model": "affine"},
                "pyramid": {"levels": 2},
            }
        )
    )
    alignment = Alignment.from_json(result.run_dir / "alignment.json")
    neighbours = [p for p in alignment.pairs if p.z_b == p.z_a + 1]
    assert all(p.ok for p in neighbours), [(p.z_a, p.reason) for p in neighbours if not p.ok]
    assert {p.downsample for p in neighbours} == {4}  # all rescued by the coarse fallback
    assert not alignment.bad_slices
    local = [
        stack_errors_px(
            {z: alignment.transforms[z], z + 1: alignment.transforms[z + 1]},
            truth,
            stack.shape[1:],
            ref=z,
        )[z + 1]
        for z in range(11)
    ]
    distorted = [
        stack_errors_px({z: np.eye(2, 3), z + 1: np.eye(2, 3)}, truth, stack.shape[1:], ref=z)[
            z + 1
        ]
        for z in range(11)
    ]
    assert before > 40 and np.median(distorted) > 40  # the distortion was large
    # measured 4-18 px at the corners (3-11 px over the central half; inlier RMS 5-6 px): real
    # content change and the published alignment's own non-affine warps. Far above the 0.1 px of
    # synthetic pairs: an open accuracy gap on real ssTEM, reported in the closing note.
    assert np.median(local) < 12 and max(local) < 22, local
