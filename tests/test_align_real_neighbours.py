"""Real neighbouring ssTEM sections (not synthetic copies) through `emflow run` with the ssTEM preset.

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
from emflow.align.solve import Alignment
from emflow.testing import write_stack
from emflow.testing.transforms import apply_to_stack, random_affines, stack_errors_px

pytestmark = [pytest.mark.real_data, pytest.mark.integration]


def test_real_vnc_neighbours_align_with_the_sstem_preset(shared_data, tmp_path):
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
                "align": {"enabled": True, "downsample": 4, "ratio": 0.9, "model": "affine"},
                "pyramid": {"levels": 2},
            }
        )
    )
    alignment = Alignment.from_json(result.run_dir / "alignment.json")
    neighbours = [p for p in alignment.pairs if p.z_b == p.z_a + 1]
    assert all(p.ok for p in neighbours), [(p.z_a, p.reason) for p in neighbours if not p.ok]
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
