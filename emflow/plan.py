"""The work plan: pyramid levels, passes of units and which z each unit owns (pure, no Dask).

A pass cuts one level's z range into blocks; pass 0 reads source slices and writes level 0
and the levels its slabs own whole (DESIGN invariant 2); later passes read the hand-off
copy of the last level the previous pass wrote. The driver plans; workers never do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from emflow.errors import RecipeError
from emflow.geometry import cut_slabs
from emflow.io.omezarr import OmeZarrWriter
from emflow.io.precomputed import PrecomputedWriter
from emflow.io.writer import Writer
from emflow.pyramid import Level, plan_levels
from emflow.recipe import OmeZarrOutput, PrecomputedOutput, Recipe

RUN_FOLDER = "emflow-run"
PARTIAL_SUFFIX = ".partial"
_GIB = 1 << 30


@dataclass(frozen=True)
class Pass:
    """Blocks of ``depth`` voxels of level ``source`` producing levels ``first..last``.

    Pass 0 reads source slices (``source`` = 0 and it writes level 0 itself).
    ``owner_depth[k]`` is the z depth (level-k voxels) each block owns, None = all.
    """

    index: int
    source: int
    first: int
    last: int
    depth: int
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    """Everything the workers need besides the recipe: levels, passes and ownership."""

    levels: tuple[Level, ...]
    passes: tuple[Pass, ...]
    owner_depth: tuple[int | None, ...]
    frame_shape_yx: tuple[int, int]
    out_dtype: str
    slab_depth: int

    def summary(self) -> str:
        lines = [f"levels: {len(self.levels)}"]
        for lev in self.levels:
            z, y, x = lev.shape_zyx
            lines.append(
                f"  {lev.index}: x {x} × y {y} × z {z}  factor(zyx) {lev.factor_zyx}  "
                f"voxel {'×'.join(f'{v:g}' for v in lev.voxel_size_nm_zyx[::-1])} nm (xyz)"
            )
        for p in self.passes:
            what = "slabs" if p.index == 0 else f"coarse pass {p.index} blocks"
            lines.append(
                f"{what}: {len(p.blocks)} of {p.depth} z (level {p.source}) → levels {p.first}..{p.last}"
            )
        return "\n".join(lines)


def _chunk_z(recipe: Recipe) -> int:
    out = 1
    for o in recipe.outputs:
        out = math.lcm(out, o.chunk_size_xyz[2])
    return out


def _max_chunk_zyx(recipe: Recipe) -> tuple[int, int, int]:
    sizes = [o.chunk_size_xyz for o in recipe.outputs]
    return (max(s[2] for s in sizes), max(s[1] for s in sizes), max(s[0] for s in sizes))


def _last_owned(levels: Sequence[Level], source: int, depth: int, unit: int, start: int) -> int:
    """Last level (≥ start) that blocks of ``depth`` level-``source`` voxels own entirely."""
    nz_src = levels[source].shape_zyx[0]
    last = start - 1
    for k in range(start, len(levels)):
        if depth >= nz_src:
            last = k
            continue
        ratio = levels[k].factor_zyx[0] // levels[source].factor_zyx[0]
        if (depth % ratio) or ((depth // ratio) % unit):
            break
        last = k
    return last


def plan_output(
    recipe: Recipe,
    n_slices: int,
    frame_shape_yx: tuple[int, int],
    in_dtype: str,
    *,
    threads: int = 1,
    memory_per_thread: int = 4 * _GIB,
) -> Plan:
    """Plan levels, slabs and coarse passes for a frame of the given shape."""
    out_dtype = "uint16" if (recipe.depth.output == "uint16" and in_dtype == "uint16") else "uint8"
    levels = tuple(
        plan_levels(
            (n_slices, *frame_shape_yx),
            recipe.voxel_size_nm,
            _max_chunk_zyx(recipe),
            recipe.pyramid.levels,
        )
    )
    unit = _chunk_z(recipe)
    ny, nx = frame_shape_yx
    in_bytes = 2 if in_dtype == "uint16" else 1
    per_slice = ny * nx * (in_bytes + 4)  # decoded source + output frame + level sums
    if recipe.run.slab_depth is not None:
        depth = recipe.run.slab_depth
        if depth % unit:
            raise RecipeError(
                f"field 'run.slab_depth': {depth} is not a multiple of the outputs' chunk depth "
                f"{unit} (a slab must own whole chunks); use {max(unit, depth - depth % unit)}"
            )
    else:
        depth = unit
        target = max(unit, n_slices / max(1, 2 * threads))
        while (
            depth * 2 <= target and depth * 2 * per_slice <= memory_per_thread and depth < n_slices
        ):
            depth *= 2
        # isotropic steps halve z at once: slabs that own only level 0 would hand a full-size
        # copy to a serial coarse pass; deepen them (memory permitting) to own level 1 too
        while (
            len(levels) > 1
            and _last_owned(levels, 0, depth, unit, 0) == 0
            and depth < n_slices
            and depth * 2 * per_slice <= memory_per_thread
        ):
            depth *= 2
    passes: list[Pass] = []
    owner: list[int | None] = [None] * len(levels)
    source, start, d, nz = 0, 0, depth, n_slices
    while start < len(levels):
        last = _last_owned(levels, source, d, unit, start)
        if last < start:  # cannot own the next level: grow the block
            d *= 2
            continue
        blocks = tuple(cut_slabs(nz, d))
        for k in range(start, last + 1):
            if len(blocks) == 1:
                owner[k] = None
            else:
                ratio = levels[k].factor_zyx[0] // levels[source].factor_zyx[0]
                owner[k] = d // ratio
        passes.append(Pass(len(passes), source, start, last, d, blocks))
        if last == len(levels) - 1:
            break
        # next pass: blocks of the hand-off level `last`, as deep as memory allows
        source, start = last, last + 1
        nz = levels[source].shape_zyx[0]
        sy, sx = levels[source].shape_zyx[1:]
        d = unit
        while d < nz and d * 2 * sy * sx * 6 <= memory_per_thread:
            d *= 2
    return Plan(levels, tuple(passes), tuple(owner), frame_shape_yx, out_dtype, depth)


def make_writers(recipe: Recipe, plan: Plan, root: Path, token: str) -> list[Writer]:
    """One writer per recipe output, writing under ``root/<name>.partial`` until the run completes."""
    writers: list[Writer] = []
    for o in recipe.outputs:
        path = root / (o.name + PARTIAL_SUFFIX)
        if isinstance(o, PrecomputedOutput):
            if o.encoding == "jpeg" and plan.out_dtype != "uint8":
                raise RecipeError(
                    f"field 'outputs.{o.name}.encoding': JPEG needs uint8 output; set depth.output "
                    "to uint8 or use encoding 'raw'"
                )
            writers.append(
                PrecomputedWriter(
                    o.name, path, o, plan.levels, plan.out_dtype, plan.owner_depth, token
                )
            )
        elif isinstance(o, OmeZarrOutput):
            writers.append(
                OmeZarrWriter(o.name, path, o, plan.levels, plan.out_dtype, plan.owner_depth, token)
            )
    return writers


def check_ownership(plan: Plan, writers: Sequence[Writer]) -> None:
    """DESIGN invariant 2: each unit's z range covers whole storage objects at every level it writes.

    A failure here is a planning bug (never bad input): parallel units would rewrite each
    other's chunks or shards.
    """
    for w in writers:
        for k, own in enumerate(plan.owner_depth):
            if own is not None and own % w.storage_z(k):
                raise RuntimeError(
                    f"emflow planning bug: level {k} of output {w.name!r} stores {w.storage_z(k)} z "
                    f"per object but units own {own} z; please report it with the recipe"
                )
