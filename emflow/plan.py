"""The work plan: pyramid levels, passes of units, and the box each unit owns (pure, no Dask).

A plan is a function of the recipe, the stack (slice count, frame, dtype) and the memory
budget the recipe states (``run.memory_per_worker`` / ``run.threads_per_worker``, else
:data:`DEFAULT_WORKER_MEMORY` per thread) -- never of the workers a cluster happens to
have. It is stored in the run folder (``plan.json``) and reused on resume.

* A **pass** cuts one level (its *source*) into a grid of **bricks**; each unit owns one
  brick and writes levels ``source..last`` of it. Pass 0 reads slices; pass ``p > 0``
  reads the integer sums of level ``source`` that pass ``p-1`` handed off, so every level
  is the mean of the level-0 voxels it covers, rounded once, however many passes there are.
* Bricks are powers of two of the chunk grid, grown in x, y, z turn (x and y up to
  :data:`BRICK_XY_PX`) as far as the budget allows; a level is owned while the brick's image
  there covers whole storage objects of every output (DESIGN invariant 2).
* ``cells[k]`` is that image at level ``k`` (None per axis = the whole axis): the writers
  build their shards inside it, so storage objects follow from the plan, not from workers.
* When pass-0 bricks do not span the frame, a ``render`` stage first renders each slice
  once (decode, warp, 8 bit, CLAHE) into a raw level-0 copy in the run folder, which the
  bricks read (each source byte is decoded once).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emflow.errors import RecipeError
from emflow.io.writer import Writer
from emflow.pyramid import Level, plan_levels, sum_dtype
from emflow.recipe import PARTIAL_SUFFIX as PARTIAL_SUFFIX  # defined with the output-name rules
from emflow.recipe import RUN_FOLDER as RUN_FOLDER
from emflow.recipe import OmeZarrOutput, PrecomputedOutput, Recipe

PLAN_JSON = "plan.json"
_GIB = 1 << 30
_MIB = 1 << 20

#: memory per worker thread assumed when the recipe states none (dask-jobqueue's usual job size)
DEFAULT_WORKER_MEMORY = 4 * _GIB
#: share of a worker thread's memory a unit may plan for (Dask pauses a worker at 80 %)
MEMORY_HEADROOM = 0.75
#: largest brick side in x and y (px of the pass's source level)
BRICK_XY_PX = 1024
#: a pass's bricks are split in z (then in x/y where no decode is repeated) down to this many
MIN_UNITS = 4
#: resident memory of an idle worker process (interpreter, numpy, tensorstore, distributed)
WORKER_BASE = 320 * _MIB
#: source bytes one render unit decodes (several slices per unit amortise its bookkeeping)
RENDER_UNIT_BYTES = 32 * _MIB


# ---------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------
Box = tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 (half-open, level voxels)


@dataclass(frozen=True)
class Pass:
    """Bricks of level ``source`` (``brick_zyx`` voxels, ``grid_zyx`` of them) writing
    levels ``source..last``; ``handoff`` is the level whose integer sums go to the next
    pass (None for the last pass). ``memory`` is one unit's planned peak, in bytes."""

    index: int
    source: int
    last: int
    shape_zyx: tuple[int, int, int]
    brick_zyx: tuple[int, int, int]
    grid_zyx: tuple[int, int, int]
    handoff: int | None
    memory: int

    @property
    def first(self) -> int:
        return self.source

    @property
    def stage(self) -> str:
        return "slab" if self.index == 0 else f"coarse{self.index}"

    @property
    def n_units(self) -> int:
        return self.grid_zyx[0] * self.grid_zyx[1] * self.grid_zyx[2]

    def box(self, i: int) -> Box:
        """The ``i``-th brick (z outermost, x innermost), clipped to the level."""
        _, gy, gx = self.grid_zyx
        iz, rest = divmod(i, gy * gx)
        iy, ix = divmod(rest, gx)
        (bz, by, bx), (nz, ny, nx) = self.brick_zyx, self.shape_zyx
        return (
            iz * bz,
            min((iz + 1) * bz, nz),
            iy * by,
            min((iy + 1) * by, ny),
            ix * bx,
            min((ix + 1) * bx, nx),
        )

    @property
    def blocks(self) -> list[Box]:
        return [self.box(i) for i in range(self.n_units)]

    @property
    def full_frame(self) -> bool:
        """True when each brick spans the whole (y, x) frame of its level."""
        return self.grid_zyx[1] == 1 and self.grid_zyx[2] == 1


@dataclass(frozen=True)
class Plan:
    """Everything the workers need besides the recipe: levels, passes, ownership cells."""

    levels: tuple[Level, ...]
    passes: tuple[Pass, ...]
    cells: tuple[tuple[int | None, int | None, int | None], ...]
    frame_shape_yx: tuple[int, int]
    in_dtype: str
    out_dtype: str
    render_stage: bool
    render_memory: int
    unit_budget: int
    budget_source: str
    render_group: int = 1  # slices per render unit
    align_memory: int = 0  # planned peak of a features unit (0: no alignment)
    render_tail_group: int = 0  # slices per unit of the last (≤ 2 groups') slices; 0: render_group

    def _render_split(self) -> tuple[int, int, int]:
        """(slices rendered in units of render_group, head units, tail group)."""
        g, n = self.render_group, self.levels[0].shape_zyx[0]
        t = self.render_tail_group or g
        head = max(0, -(-(n - 2 * g) // g) * g) if t < g else n  # whole groups, then ≤ 2 groups
        return head, -(-head // g), t

    @property
    def render_units(self) -> int:
        """Units of ``render_group`` slices, then the last ``2 × render_group`` slices in units
        of ``render_tail_group``: the stage ends on short units, so no worker waits long for
        the last one before the first pass can start."""
        if not self.render_stage:
            return 0
        head, head_units, t = self._render_split()
        return head_units + -(-(self.levels[0].shape_zyx[0] - head) // t)

    def render_slices(self, i: int) -> tuple[int, int]:
        """z range [z0, z1) of render unit ``i``."""
        g, n = self.render_group, self.levels[0].shape_zyx[0]
        head, head_units, t = self._render_split()
        if i < head_units:
            return i * g, min((i + 1) * g, head)
        j = i - head_units
        return head + j * t, min(head + (j + 1) * t, n)

    @property
    def slab_depth(self) -> int:
        """z depth of the pass-0 bricks (slices)."""
        return self.passes[0].brick_zyx[0]

    @property
    def memory_per_unit(self) -> int:
        """The largest planned peak of any unit (bytes)."""
        return max(
            [p.memory for p in self.passes]
            + [self.render_memory if self.render_stage else 0, self.align_memory]
        )

    def worker_memory(self, threads: int) -> int:
        """Planned peak of a worker running ``threads`` units at once (one process base)."""
        return WORKER_BASE + max(1, threads) * (self.memory_per_unit - WORKER_BASE)

    @property
    def max_value(self) -> int:
        return 65535 if self.out_dtype == "uint16" else 255

    def handoff_dtype(self, level: int) -> str:
        """dtype of the integer sums handed off at ``level``."""
        n = math.prod(self.levels[level].factor_zyx)
        return sum_dtype(self.max_value, n).name

    def _render_sizes(self) -> str:
        head, head_units, t = self._render_split()
        if head_units == self.render_units:
            return str(self.render_group)
        return f"{self.render_group} (the last {self.levels[0].shape_zyx[0] - head}: {t})"

    def stages(self) -> list[tuple[str, int, int]]:
        """(stage, units, planned memory per unit) in execution order (pyramid stages)."""
        out = []
        if self.render_stage:
            out.append(("render", self.render_units, self.render_memory))
        out += [(p.stage, p.n_units, p.memory) for p in self.passes]
        return out

    def summary(self) -> str:
        ny, nx = self.frame_shape_yx
        lines = [
            f"frame: x {nx} × y {ny} px, {self.levels[0].shape_zyx[0]} slices, "
            f"{self.in_dtype} → {self.out_dtype}",
            f"levels: {len(self.levels)}",
        ]
        for lev, cell in zip(self.levels, self.cells, strict=True):
            z, y, x = lev.shape_zyx
            own = "×".join("all" if c is None else str(c) for c in cell[::-1])
            lines.append(
                f"  {lev.index}: x {x} × y {y} × z {z}  factor(zyx) {lev.factor_zyx}  "
                f"voxel {'×'.join(f'{v:g}' for v in lev.voxel_size_nm_zyx[::-1])} nm (xyz)  "
                f"unit owns x×y×z {own}"
            )
        lines.append(f"memory budget per unit: {_gib(self.unit_budget)} ({self.budget_source})")
        if self.align_memory:
            lines.append(
                f"stages features, match (alignment): planned {_gib(self.align_memory)} per unit"
            )
        if self.render_stage:
            lines.append(
                f"stage render: {self.render_units} units of {self._render_sizes()} slice(s) "
                f"(decode, warp, CLAHE → raw level-0 copy in the run folder), "
                f"planned {_gib(self.render_memory)} per unit"
            )
        for p in self.passes:
            bz, by, bx = p.brick_zyx
            src = "slices" if p.index == 0 else f"sums of level {p.source}"
            hand = f", hands off sums of level {p.handoff}" if p.handoff is not None else ""
            lines.append(
                f"stage {p.stage}: {p.n_units} units of x {bx} × y {by} × z {bz} "
                f"(level {p.source}; grid {p.grid_zyx[2]}×{p.grid_zyx[1]}×{p.grid_zyx[0]}) "
                f"from {src} → levels {p.source}..{p.last}{hand}, "
                f"planned {_gib(p.memory)} per unit"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from emflow.reprs import plan_html

        return plan_html(self)

    # ---- storage in the run folder --------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "levels": [
                {
                    "index": lev.index,
                    "factor_zyx": list(lev.factor_zyx),
                    "shape_zyx": list(lev.shape_zyx),
                    "voxel_size_nm_zyx": list(lev.voxel_size_nm_zyx),
                }
                for lev in self.levels
            ],
            "passes": [
                {
                    "index": p.index,
                    "source": p.source,
                    "last": p.last,
                    "shape_zyx": list(p.shape_zyx),
                    "brick_zyx": list(p.brick_zyx),
                    "grid_zyx": list(p.grid_zyx),
                    "handoff": p.handoff,
                    "memory": p.memory,
                }
                for p in self.passes
            ],
            "cells": [list(c) for c in self.cells],
            "frame_shape_yx": list(self.frame_shape_yx),
            "in_dtype": self.in_dtype,
            "out_dtype": self.out_dtype,
            "render_stage": self.render_stage,
            "render_memory": self.render_memory,
            "unit_budget": self.unit_budget,
            "budget_source": self.budget_source,
            "render_group": self.render_group,
            "align_memory": self.align_memory,
            "render_tail_group": self.render_tail_group,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        t = tuple
        return cls(
            levels=t(
                Level(
                    d["index"],
                    t(d["factor_zyx"]),
                    t(d["shape_zyx"]),
                    t(float(v) for v in d["voxel_size_nm_zyx"]),
                )
                for d in data["levels"]
            ),
            passes=t(
                Pass(
                    d["index"],
                    d["source"],
                    d["last"],
                    t(d["shape_zyx"]),
                    t(d["brick_zyx"]),
                    t(d["grid_zyx"]),
                    d["handoff"],
                    d["memory"],
                )
                for d in data["passes"]
            ),
            cells=t(t(c) for c in data["cells"]),
            frame_shape_yx=t(data["frame_shape_yx"]),
            in_dtype=data["in_dtype"],
            out_dtype=data["out_dtype"],
            render_stage=data["render_stage"],
            render_memory=data["render_memory"],
            unit_budget=data["unit_budget"],
            budget_source=data["budget_source"],
            render_group=data.get("render_group", 1),
            align_memory=data.get("align_memory", 0),
            render_tail_group=data.get("render_tail_group", 0),  # older plans: no tail units
        )

    def save(self, run_dir: Path) -> None:
        """Write ``plan.json`` atomically into the run folder."""
        path = Path(run_dir) / PLAN_JSON
        tmp = path.with_name(f".{PLAN_JSON}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)


def load_plan(run_dir: Path) -> Plan | None:
    """The plan stored in a run folder, or None."""
    try:
        return Plan.from_json(json.loads((Path(run_dir) / PLAN_JSON).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_IUNITS = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_memory(text: str | int, field: str = "run.memory_per_worker") -> int:
    """Bytes of a memory size like ``4GiB``, ``4 GB``, ``4000MB`` or ``4G``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text).lower())
    if not m:
        raise RecipeError(f"field '{field}': {text!r} is not a memory size; use e.g. 4GiB")
    unit = m.group(2) or ""
    scale = _IUNITS[unit] if unit.endswith("i") else _UNITS[unit]
    return int(float(m.group(1)) * scale)


def unit_budget(recipe: Recipe) -> tuple[int, str]:
    """(bytes one unit may plan for, where that figure comes from): from the recipe only."""
    threads = recipe.run.threads_per_worker or 1
    if recipe.run.memory_per_worker is not None:
        per = parse_memory(recipe.run.memory_per_worker) / threads
        src = f"run.memory_per_worker {recipe.run.memory_per_worker} / {threads} thread(s)"
    else:
        per = DEFAULT_WORKER_MEMORY / (1 if recipe.run.threads_per_worker is None else threads)
        src = f"default {_gib(DEFAULT_WORKER_MEMORY)} per worker thread"
    return int(per * MEMORY_HEADROOM), f"{src} × {MEMORY_HEADROOM:g} headroom"


def _render_memory(
    frame_yx: tuple[int, int], in_bytes: int, out_bytes: int, clahe_px: int = 0
) -> int:
    """One slice rendered: decoded (or cached) source, its zstd buffer, the warped copy, the
    8-bit and CLAHE copies; CLAHE blends in float32 one kernel-sized rectangle at a time."""
    px = frame_yx[0] * frame_yx[1]
    return int(px * (3 * in_bytes + 2 * out_bytes) + 16 * clahe_px)


def _align_memory(source_yx: tuple[int, int], in_bytes: int) -> int:
    """A features unit: the decoded slice, its QC and zstd copies, SIFT on a copy of at most
    1024 px (float32 scale space and descriptors: about 96 MiB)."""
    return WORKER_BASE + int(source_yx[0] * source_yx[1] * 3 * in_bytes) + 96 * _MIB


def _pass_memory(
    voxels: int,
    in_item: int,
    out_bytes: int,
    n_outputs: int,
    render_px: int,
    in_bytes: int,
    render_threads: int,
    clahe_px: int = 0,
) -> int:
    """Planned peak of one unit: base + the block + downsample temporaries + writer buffers.

    ``in_item`` is the bytes per voxel of what the unit reads (1-2 for slices, 2-8 for
    hand-off sums); ``render_px`` > 0 when the unit renders whole slices itself.
    """
    block = voxels * in_item
    rounded = voxels * out_bytes if in_item != out_bytes else 0  # level `source` from sums
    # the first step sums pairs along z, then y, then x: at most half the voxels in
    # 2-4 byte integers beside the block, then quarter-size levels
    temps = voxels * max(2, in_item)
    writers = int(1.3 * n_outputs * voxels * out_bytes)
    render = (
        render_threads * _render_memory((1, render_px), in_bytes, out_bytes, clahe_px)
        if render_px
        else 0
    )
    return WORKER_BASE + block + rounded + temps + writers + render


# ---------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------
def _chunk_zyx(recipe: Recipe) -> tuple[int, int, int]:
    """Per-axis least common multiple of every output's chunk (z, y, x)."""
    out = [1, 1, 1]
    for o in recipe.outputs:
        cx, cy, cz = o.chunk_size_xyz
        out = [math.lcm(out[0], cz), math.lcm(out[1], cy), math.lcm(out[2], cx)]
    return out[0], out[1], out[2]


def _max_chunk_zyx(recipe: Recipe) -> tuple[int, int, int]:
    sizes = [o.chunk_size_xyz for o in recipe.outputs]
    return (max(s[2] for s in sizes), max(s[1] for s in sizes), max(s[0] for s in sizes))


def _atom(recipe: Recipe, level: Level) -> tuple[int, int, int]:
    """Per axis, the storage step a unit's box must be a multiple of at this level."""
    out = list(_chunk_zyx(recipe))
    for o in recipe.outputs:
        if isinstance(o, OmeZarrOutput) and o.version == "0.5" and o.shard_size_xyz:
            sx, sy, sz = o.shard_size_xyz
            for a, s in enumerate((sz, sy, sx)):
                out[a] = math.lcm(out[a], min(s, _round_up(level.shape_zyx[a], out[a])))
    return out[0], out[1], out[2]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _bits(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _max_shard_bits(recipe: Recipe) -> int:
    caps = [
        o.shard_chunks_max.bit_length() - 1
        for o in recipe.outputs
        if isinstance(o, PrecomputedOutput) and o.sharded
    ]
    return min(caps) if caps else 12


def _owned_last(
    recipe: Recipe, levels: Sequence[Level], source: int, brick: Sequence[int], grid: Sequence[int]
) -> int:
    """Last level (≥ source) whose brick image covers whole storage objects of every output,
    such that the next level's image is still whole voxels (for the hand-off)."""
    fs = levels[source].factor_zyx
    last = source
    for k in range(source + 1, len(levels)):
        fk, atom = levels[k].factor_zyx, _atom(recipe, levels[k])
        ok = True
        for a in range(3):
            if grid[a] == 1:
                continue
            num = brick[a] * fs[a]
            if num % fk[a] or (num // fk[a]) % atom[a]:
                ok = False
                break
        if not ok:
            break
        last = k
    # the hand-off level must be whole voxels of every brick
    while last + 1 < len(levels):
        fh = levels[last + 1].factor_zyx
        if all(grid[a] == 1 or (brick[a] * fs[a]) % fh[a] == 0 for a in range(3)):
            break
        last -= 1
        if last < source:
            raise RuntimeError(
                "emflow planning bug: a brick's image is not whole voxels at the next level; "
                "please report it with the recipe"
            )
    return last


def _cells(
    levels: Sequence[Level], source: int, last: int, brick: Sequence[int], grid: Sequence[int]
) -> list[tuple[int | None, int | None, int | None]]:
    fs = levels[source].factor_zyx
    out = []
    for k in range(source, last + 1):
        fk = levels[k].factor_zyx
        cell = tuple(None if grid[a] == 1 else brick[a] * fs[a] // fk[a] for a in range(3))
        out.append(cell)
    return out  # type: ignore[return-value]


def _brick_bits(
    grid_bits: Sequence[int], xy_cap: int, total_cap: int, order_out: list[int]
) -> list[int]:
    """Bits per axis (z, y, x) grown x, y, z in turn (Morton order) within the caps."""
    used = [0, 0, 0]
    caps = [grid_bits[0], min(grid_bits[1], xy_cap), min(grid_bits[2], xy_cap)]
    while sum(used) < total_cap:
        placed = False
        for a in (2, 1, 0):
            if sum(used) >= total_cap:
                break
            if used[a] < caps[a]:
                used[a] += 1
                order_out.append(a)
                placed = True
        if not placed:
            break
    return used


def _plan_pass(
    recipe: Recipe,
    levels: Sequence[Level],
    index: int,
    source: int,
    budget: int,
    *,
    in_dtype: str,
    out_dtype: str,
    frame_px: int,
    brick_xy_px: int,
) -> Pass:
    lev = levels[source]
    shape = lev.shape_zyx
    chunk = _chunk_zyx(recipe)
    atom = _atom(recipe, lev)
    out_bytes = 2 if out_dtype == "uint16" else 1
    in_bytes = 2 if in_dtype == "uint16" else 1
    max_value = 65535 if out_dtype == "uint16" else 255
    item = out_bytes if index == 0 else sum_dtype(max_value, math.prod(lev.factor_zyx)).itemsize
    n_out = len(recipe.outputs)
    k = recipe.enhance.kernel_size_px
    clahe_px = min(frame_px, k * k) if recipe.enhance.clip_limit > 0 else 0
    grid_bits = [_bits(-(-shape[a] // chunk[a])) for a in range(3)]
    order: list[int] = []
    xy_cap = max(0, (brick_xy_px // max(chunk[1], chunk[2])).bit_length() - 1)
    used = _brick_bits(grid_bits, xy_cap, _max_shard_bits(recipe), order)
    forced_z = recipe.run.slab_depth if index == 0 else None

    def brick_of(bits: Sequence[int]) -> list[int]:
        b = []
        for a in range(3):
            side = _round_up(chunk[a] << bits[a], atom[a])
            b.append(min(side, _round_up(shape[a], atom[a])))
        if forced_z is not None:
            b[0] = min(forced_z, _round_up(shape[0], chunk[0]))
        return b

    def grid_of(b: Sequence[int]) -> list[int]:
        return [-(-shape[a] // b[a]) for a in range(3)]

    def memory_of(b: Sequence[int]) -> int:
        g = grid_of(b)
        vox = min(b[0], shape[0]) * min(b[1], shape[1]) * min(b[2], shape[2])
        own_render = index == 0 and g[1] == 1 and g[2] == 1
        return _pass_memory(
            vox, in_bytes if own_render else item, out_bytes, n_out,
            frame_px if own_render else 0, in_bytes, 2, clahe_px,
        )  # fmt: skip

    def shrink(allowed: set[int]) -> bool:
        for j in range(len(order) - 1, -1, -1):
            a = order[j]
            if a in allowed and used[a] > 0:
                if a == 0 and forced_z is not None:
                    continue
                used[a] -= 1
                del order[j]
                return True
        return False

    # fit the budget: give back the last bits grown
    while memory_of(brick_of(used)) > budget:
        if not shrink({0, 1, 2}):
            raise RecipeError(
                _too_big(recipe, source, brick_of(used), memory_of(brick_of(used)), budget)
            )
    # enough units to keep workers busy: split in z, and in y/x unless that repeats decoding,
    # as long as the units still own as many levels
    while math.prod(grid_of(brick_of(used))) < MIN_UNITS:
        b = brick_of(used)
        g = grid_of(b)
        owns = _owned_last(recipe, levels, source, b, g)
        allowed = {0} if (index == 0 and g[1] == 1 and g[2] == 1) else {0, 1, 2}
        before = (list(used), list(order))
        if not shrink(allowed):
            break
        b2 = brick_of(used)
        if _owned_last(recipe, levels, source, b2, grid_of(b2)) < owns:
            used[:], order[:] = before
            break
    brick = brick_of(used)
    grid = grid_of(brick)
    last = _owned_last(recipe, levels, source, brick, grid)
    handoff = last + 1 if last + 1 < len(levels) else None
    mem = memory_of(brick)
    if handoff is not None:
        fh = levels[handoff].factor_zyx
        hvox = math.prod(-(-min(brick[a], shape[a]) * lev.factor_zyx[a] // fh[a]) for a in range(3))
        mem += hvox * sum_dtype(max_value, math.prod(fh)).itemsize
    return Pass(index, source, last, tuple(shape), tuple(brick), tuple(grid), handoff, int(mem))  # type: ignore[arg-type]


def _too_big(recipe: Recipe, level: int, brick: Sequence[int], need: int, budget: int) -> str:
    fields = []
    for o in recipe.outputs:
        given = isinstance(o, OmeZarrOutput) and o.shard_size_xyz is not None
        fields.append(f"outputs.{o.name}.{'shard_size_xyz' if given else 'chunk_size_xyz'}")
    z, y, x = brick
    return (
        f"the smallest unit that owns whole chunks/shards of level {level} (x {x} × y {y} × z {z} "
        f"voxels) needs {_gib(need)}, more than the {_gib(budget)} a unit may use; make "
        f"{' / '.join(fields)} smaller, or raise run.memory_per_worker"
    )


def plan_output(
    recipe: Recipe,
    n_slices: int,
    frame_shape_yx: tuple[int, int],
    in_dtype: str,
    *,
    budget: int | None = None,
    brick_xy_px: int = BRICK_XY_PX,
    windowed: bool = False,
) -> Plan:
    """Plan levels, passes and ownership for a stack of ``n_slices`` frames of this shape.

    ``budget`` (bytes per unit) overrides the recipe's (see :func:`unit_budget`);
    ``brick_xy_px`` the largest brick side in x and y (tests use small ones); ``windowed``:
    slices need no rendering and can be read by window (uncompressed TIFF, no alignment,
    no CLAHE), so bricks cut in x/y read them directly instead of a rendered copy.
    """
    out_dtype = "uint16" if (recipe.depth.output == "uint16" and in_dtype == "uint16") else "uint8"
    if recipe.run.slab_depth is not None:
        unit = _chunk_zyx(recipe)[0]
        depth = recipe.run.slab_depth
        if depth % unit:
            raise RecipeError(
                f"field 'run.slab_depth': {depth} is not a multiple of the outputs' chunk depth "
                f"{unit} (a slab must own whole chunks); use {max(unit, depth - depth % unit)}"
            )
    levels = tuple(
        plan_levels(
            (n_slices, *frame_shape_yx),
            recipe.voxel_size_nm,
            _max_chunk_zyx(recipe),
            recipe.pyramid.levels,
        )
    )
    if budget is None:
        budget, source_text = unit_budget(recipe)
    else:
        source_text = "given"
    in_bytes = 2 if in_dtype == "uint16" else 1
    out_bytes = 2 if out_dtype == "uint16" else 1
    frame_px = frame_shape_yx[0] * frame_shape_yx[1]
    passes: list[Pass] = []
    cells: list[tuple[int | None, int | None, int | None]] = []
    source = 0
    while source < len(levels):
        p = _plan_pass(
            recipe,
            levels,
            len(passes),
            source,
            budget,
            in_dtype=in_dtype,
            out_dtype=out_dtype,
            frame_px=frame_px,
            brick_xy_px=brick_xy_px,
        )
        passes.append(p)
        cells += _cells(levels, p.source, p.last, p.brick_zyx, p.grid_zyx)
        source = p.last + 1
    render = not passes[0].full_frame and not windowed
    k = recipe.enhance.kernel_size_px
    clahe_px = min(frame_px, k * k) if recipe.enhance.clip_limit > 0 else 0
    render_mem = WORKER_BASE + _render_memory(frame_shape_yx, in_bytes, out_bytes, clahe_px)
    if render and render_mem > budget:
        ny, nx = frame_shape_yx
        raise RecipeError(
            f"rendering one {nx} × {ny} slice needs {_gib(render_mem)}, more than the "
            f"{_gib(budget)} a unit may use; raise run.memory_per_worker"
        )
    # render units: RENDER_UNIT_BYTES of source each, yet at least MIN_UNITS of them; the
    # last 2 groups' slices in quarter-size units (a short tail before the first pass)
    n = len(levels) and levels[0].shape_zyx[0]
    group = max(1, min(RENDER_UNIT_BYTES // max(1, frame_px * in_bytes), n // MIN_UNITS))
    tail_group = max(1, group // 4) if n > 2 * group else group
    return Plan(
        levels,
        tuple(passes),
        tuple(cells),
        tuple(frame_shape_yx),  # type: ignore[arg-type]
        in_dtype,
        out_dtype,
        render,
        render_mem if render else 0,
        int(budget),
        source_text,
        group if render else 1,
        _align_memory(frame_shape_yx, in_bytes) if recipe.align.enabled else 0,
        tail_group if render else 0,
    )


# ---------------------------------------------------------------------------------------
# writers and the ownership check
# ---------------------------------------------------------------------------------------
def make_writers(recipe: Recipe, plan: Plan, root: Path | str, token: str) -> list[Writer]:
    """One writer per recipe output, writing under ``root/<name>.partial`` until the run completes
    (``root`` a bucket URL: straight to ``root/<name>``, metadata published last)."""
    from emflow.io.location import is_url
    from emflow.io.omezarr import OmeZarrWriter  # tensorstore: loaded when writers are made
    from emflow.io.precomputed import PrecomputedWriter

    writers: list[Writer] = []
    for o in recipe.outputs:
        if is_url(str(root)):
            path: Path | str = f"{str(root).rstrip('/')}/{o.name}"
        else:
            path = Path(root) / (o.name + PARTIAL_SUFFIX)
        if isinstance(o, PrecomputedOutput):
            if o.encoding == "jpeg" and plan.out_dtype != "uint8":
                raise RecipeError(
                    f"field 'outputs.{o.name}.encoding': JPEG needs uint8 output; set depth.output "
                    "to uint8 or use encoding 'raw'"
                )
            writers.append(
                PrecomputedWriter(o.name, path, o, plan.levels, plan.out_dtype, plan.cells, token)
            )
        elif isinstance(o, OmeZarrOutput):
            writers.append(
                OmeZarrWriter(o.name, path, o, plan.levels, plan.out_dtype, plan.cells, token)
            )
    return writers


def check_ownership(plan: Plan, writers: Sequence[Writer]) -> None:
    """DESIGN invariant 2: each unit's box covers whole storage objects at every level it writes.

    A failure here is a planning bug (never bad input): parallel units would rewrite each
    other's chunks or shards.
    """
    for w in writers:
        for k, cell in enumerate(plan.cells):
            obj = w.storage_zyx(k)
            for a in range(3):
                if cell[a] is not None and cell[a] % obj[a]:
                    raise RuntimeError(
                        f"emflow planning bug: level {k} of output {w.name!r} stores {obj} (zyx) "
                        f"per object but units own {cell}; please report it with the recipe"
                    )


# ---------------------------------------------------------------------------------------
# what `emflow plan` shows: the plan `emflow run` will execute
# ---------------------------------------------------------------------------------------
def windowed_stack(recipe: Recipe, refs: Sequence[Any], aligned: bool) -> bool:
    """Whether bricks may read this stack's slices by window (see :func:`plan_output`)."""
    if aligned or recipe.enhance.clip_limit > 0:
        return False
    from emflow.io.windows import stack_windowed

    return stack_windowed(list(refs))


def plan_preview(
    recipe: Recipe,
    n_slices: int,
    shape_yx: tuple[int, int],
    in_dtype: str,
    *,
    alignment_path: str | Path | None = None,
    refs: Sequence[Any] = (),
) -> tuple[Plan, str]:
    """The plan ``emflow run`` would execute now, and a note on where it comes from.

    A run folder holding a run of this recipe with a stored plan: that plan (a resumed run
    executes it). Otherwise a new plan for the output frame: that of ``alignment_path``,
    of the run folder's ``alignment.json`` (an interrupted run's solve), or the source frame.
    """
    run_dir = recipe.run_folder
    frame, note = tuple(shape_yx), "frame: the source slices' (no alignment)"
    saved = Path(alignment_path) if alignment_path is not None else None
    if saved is None and recipe.align.enabled and (run_dir / "alignment.json").is_file():
        saved = run_dir / "alignment.json"
    if saved is not None:
        from emflow.align.solve import Alignment

        frame = tuple(Alignment.from_json(saved).frame_shape_yx)
        note = f"frame: from {saved}"
    elif recipe.align.enabled and recipe.align.frame == "slice":
        note = "frame: the source slices' (align.frame: slice keeps it after the solve)"
    elif recipe.align.enabled:
        note = (
            "frame: the source slices'; alignment is on, and the run plans again after its solve "
            "(the aligned frame is usually larger)"
        )
    try:
        stored_fp = json.loads((run_dir / "run.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        stored_fp = None
    if stored_fp == recipe.output_fingerprint():
        old = load_plan(run_dir)
        if (
            old is not None
            and old.levels[0].shape_zyx[0] == n_slices
            and old.in_dtype == in_dtype
            and (saved is not None or not recipe.align.enabled)
            and old.frame_shape_yx == frame
        ):
            return old, f"stored in {run_dir / PLAN_JSON}: the resumed run executes it"
    windowed = windowed_stack(recipe, refs, saved is not None or recipe.align.enabled)
    return plan_output(recipe, n_slices, frame, in_dtype, windowed=windowed), note  # type: ignore[arg-type]
