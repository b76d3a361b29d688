"""Pipeline helpers: banded downsampling equals whole-block downsampling; slab plans own whole shards."""

from __future__ import annotations

import numpy as np
import pytest

from emflow.plan import plan_output
from emflow.pyramid import downsample_levels
from emflow.recipe import recipe_from_dict
from emflow.render import downsample_in_bands


@pytest.mark.parametrize("ny,threads", [(77, 2), (64, 3), (5, 2), (130, 4)])
def test_bands_equal_whole(ny, threads):
    rng = np.random.default_rng(ny)
    block = rng.integers(0, 256, size=(9, ny, 41), dtype=np.uint8)
    steps = [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    for got, want in zip(
        downsample_in_bands(block, steps, threads), downsample_levels(block, steps), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_plan_for_anisotropic_and_isotropic_stacks():
    def recipe(vs, **run):
        return recipe_from_dict(
            {
                "source": {"glob": "x/*.png"},
                "voxel_size_nm": vs,
                "output_dir": "o",
                "outputs": [{"format": "precomputed"}, {"format": "omezarr"}],
                "run": run,
            }
        )

    # ssTEM: 2000 slices of 8k: slabs of 64 own the xy-only levels; coarse passes do the rest
    p = plan_output(
        recipe([4, 4, 40]), 2000, (8192, 8192), "uint8", threads=8, memory_per_thread=4 << 30
    )
    assert p.slab_depth == 64 and p.passes[0].last >= 3 and p.passes[0].blocks[-1] == (1984, 2000)
    for k, own in enumerate(p.owner_depth):
        assert own is None or own % 64 == 0, (k, own)
    covered = [z for z0, z1 in p.passes[0].blocks for z in range(z0, z1)]
    assert covered == list(range(2000))
    # a slab depth that is not a chunk multiple is refused, naming the field
    from emflow.errors import RecipeError

    with pytest.raises(RecipeError, match=r"run\.slab_depth"):
        plan_output(recipe([4, 4, 40], slab_depth=100), 2000, (512, 512), "uint8")


def test_every_planned_level_owns_whole_storage_objects():
    """Invariant 2 for many shapes: the plan's unit depths divide each writer's chunk/shard depth."""
    from pathlib import Path

    from emflow.plan import check_ownership, make_writers

    r = recipe_from_dict(
        {
            "source": {"glob": "x/*.png"},
            "voxel_size_nm": [4, 4, 40],
            "output_dir": "o",
            "outputs": [
                {"format": "precomputed", "chunk_size_xyz": [32, 32, 32]},
                {"format": "omezarr", "name": "z5"},
                {"format": "omezarr", "name": "z4", "version": "0.4"},
            ],
        }
    )
    for n, frame in [(37, (777, 1000)), (2000, (8192, 8192)), (300, (5000, 300)), (129, (64, 64))]:
        for memory in (1 << 28, 4 << 30):
            plan = plan_output(r, n, frame, "uint8", threads=4, memory_per_thread=memory)
            check_ownership(plan, make_writers(r, plan, Path("/nonexistent"), token="t"))
            assert (
                any(own is not None for own in plan.owner_depth) or len(plan.passes[0].blocks) == 1
            )
