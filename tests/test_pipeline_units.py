"""The planner: a function of the recipe and the stack alone; units tile every level once, own
whole storage objects, fit the memory budget; banded downsampling equals whole-block."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emflow.errors import RecipeError
from emflow.plan import (
    MIN_UNITS,
    Plan,
    check_ownership,
    make_writers,
    plan_output,
    unit_budget,
)
from emflow.pyramid import downsample_levels
from emflow.recipe import recipe_from_dict
from emflow.render import downsample_in_bands


def _recipe(vs=(4, 4, 40), outputs=None, **run):
    return recipe_from_dict(
        {
            "source": {"glob": "x/*.png"},
            "voxel_size_nm": list(vs),
            "output_dir": "o",
            "outputs": outputs or [{"format": "precomputed"}, {"format": "omezarr"}],
            "run": run,
        }
    )


@pytest.mark.parametrize("ny,threads", [(77, 2), (64, 3), (5, 2), (130, 4)])
def test_bands_equal_whole(ny, threads):
    rng = np.random.default_rng(ny)
    block = rng.integers(0, 256, size=(9, ny, 41), dtype=np.uint8)
    steps = [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    counts = [np.ones(n, np.int64) for n in block.shape]
    got, sums = downsample_in_bands(
        block, counts, steps, threads, max_value=255, dtype=np.dtype(np.uint8), keep_sums=True
    )
    for g, want in zip(got, downsample_levels(block, steps), strict=True):
        np.testing.assert_array_equal(g, want)
    # the kept sums are the exact level-0 sums of the last level's voxels
    f = (2, 8, 8)
    ref = np.add.reduceat(
        np.add.reduceat(
            np.add.reduceat(block.astype(np.int64), np.arange(0, 9, f[0]), 0),
            np.arange(0, ny, f[1]),
            1,
        ),
        np.arange(0, 41, f[2]),
        2,
    )
    np.testing.assert_array_equal(sums, ref)


def _tiles(plan: Plan) -> None:
    """Every pass's bricks cover its source level exactly once (bricks are a grid: each axis's
    intervals partition it, and every combination appears once)."""
    for p in plan.passes:
        boxes = [p.box(i) for i in range(p.n_units)]
        assert len(set(boxes)) == len(boxes)
        for a in range(3):
            spans = sorted({(b[2 * a], b[2 * a + 1]) for b in boxes})
            assert spans[0][0] == 0 and spans[-1][1] == p.shape_zyx[a], (p, a)
            assert all(s1 == t0 and t1 > t0 for (_, s1), (t0, t1) in itertools.pairwise(spans))
            assert len(spans) == p.grid_zyx[a]


STACKS = [
    ((4, 4, 40), 2000, (8192, 8192)),
    ((8, 8, 8), 128, (2048, 2048)),
    ((8, 8, 8), 64, (8192, 8192)),
    ((8, 8, 8), 32, (16384, 16384)),
    ((8, 8, 8), 256, (4096, 4096)),
    ((4, 4, 40), 37, (777, 1000)),
    ((4, 4, 40), 300, (300, 5000)),
    ((4, 4, 40), 129, (64, 64)),
]


@pytest.mark.parametrize("vs,n,frame", STACKS)
def test_plan_tiles_levels_owns_shards_and_fits(vs, n, frame):
    outputs = [
        {"format": "precomputed", "chunk_size_xyz": [32, 32, 32]},
        {"format": "omezarr", "name": "z5"},
        {"format": "omezarr", "name": "z4", "version": "0.4"},
    ]
    r = _recipe(vs, outputs)
    plan = plan_output(r, n, frame, "uint8")
    _tiles(plan)
    check_ownership(plan, make_writers(r, plan, Path("/nonexistent"), token="t"))
    budget, _ = unit_budget(r)
    assert plan.memory_per_unit <= budget
    # levels follow each other across passes; each pass hands its successor the next level
    assert plan.passes[0].source == 0 and plan.passes[-1].last == len(plan.levels) - 1
    for a, b in zip(plan.passes, plan.passes[1:], strict=False):
        assert a.handoff == a.last + 1 == b.source
    # work for every worker where the volume allows it (units never split to own fewer levels)
    if n * frame[0] * frame[1] >= 128 * 2048 * 2048:
        assert plan.passes[0].n_units >= MIN_UNITS
    # frames wider than a brick are rendered once, then read by the units
    assert plan.render_stage == (not plan.passes[0].full_frame)


def test_plan_depends_on_recipe_and_stack_only():
    r = _recipe((8, 8, 8))
    a = plan_output(r, 128, (2048, 2048), "uint8")
    b = plan_output(r, 128, (2048, 2048), "uint8")
    assert a == b
    # through plan.json and back
    assert Plan.from_json(json.loads(json.dumps(a.to_json()))) == a
    # a budget the recipe states cuts smaller units; memory never exceeds it
    small = _recipe((8, 8, 8), memory_per_worker="1.2GiB")
    p = plan_output(small, 128, (2048, 2048), "uint8")
    assert p.memory_per_unit <= unit_budget(small)[0] < a.memory_per_unit
    assert p.passes[0].n_units > a.passes[0].n_units
    assert "run.memory_per_worker 1.2GiB" in p.summary()


def test_smallest_legal_unit_too_big_names_the_sizes_to_change():
    r = _recipe(
        (8, 8, 8),
        [{"format": "omezarr", "name": "big", "shard_size_xyz": [4096, 4096, 256]}],
        memory_per_worker="2GiB",
    )
    with pytest.raises(RecipeError, match=r"outputs\.big.*shard_size_xyz.*run\.memory_per_worker"):
        plan_output(r, 512, (8192, 8192), "uint8")


def test_slab_depth_sets_pass_0_depth_and_must_be_a_chunk_multiple():
    p = plan_output(_recipe(slab_depth=128), 2000, (1024, 1024), "uint8")
    assert p.passes[0].brick_zyx[0] == 128 and p.passes[0].box(0)[:2] == (0, 128)
    with pytest.raises(RecipeError, match=r"run\.slab_depth"):
        plan_output(_recipe(slab_depth=100), 2000, (512, 512), "uint8")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    ny=st.integers(1, 20000),
    nx=st.integers(1, 20000),
    vs=st.sampled_from([(4, 4, 40), (8, 8, 8), (5, 5, 30)]),
    chunk=st.sampled_from([[64, 64, 64], [128, 128, 16], [32, 32, 32]]),
    memory=st.sampled_from([None, "1GiB", "2GiB", "16GiB"]),
)
def test_any_stack_gets_a_legal_plan(n, ny, nx, vs, chunk, memory):
    outputs = [
        {"format": "precomputed", "encoding": "jpeg", "chunk_size_xyz": chunk},
        {"format": "omezarr", "chunk_size_xyz": chunk},
    ]
    r = _recipe(vs, outputs, memory_per_worker=memory)
    try:
        plan = plan_output(r, n, (ny, nx), "uint8")
    except RecipeError as exc:  # only when even one slice or one chunk column cannot fit
        assert "memory_per_worker" in str(exc)
        return
    assert plan.memory_per_unit <= unit_budget(r)[0]
    check_ownership(plan, make_writers(r, plan, Path("/nonexistent"), token="t"))
    for p in plan.passes:
        assert p.n_units >= 1 and all(b > 0 for b in p.brick_zyx)


def test_worker_units_stop_numpy_asking_for_huge_pages():
    """Units (and the workers' warm-up) turn numpy's MADV_HUGEPAGE advice off: fresh huge
    pages stall in direct compaction where THP defrag is 'madvise' (emflow.memory)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    from emflow.render import warm_up

    warm_up()
    assert multiarray._get_madvise_hugepage() is False
