"""The only module that turns a recipe into Dask work (or a serial loop).

Stages, in order (each a list of independent units, see :mod:`emflow.lattice.execute`):

``stats``     16-bit input only: sample slices → the window mapped to 8 bits
``features``  per slice: SIFT on a reduced copy (alignment only)
``match``     per pair (z, z+1), (z, z+2): RANSAC model (alignment only)
``solve``     in the driver: transforms + global bounding box → alignment.json
``slab``      per slab of ``slab_depth`` slices: decode → warp → 8-bit → CLAHE →
              levels 0..e of that slab written to every output (whole shards)
``coarseN``   levels whose storage spans several slabs, from the level below

A slab owns whole chunks/shards at every level it writes (DESIGN invariant 2);
levels it cannot own are built in later passes from a lossless hand-off copy of
the last level written, kept in the run folder.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emflow.align.warp import warp_slice
from emflow.bitdepth import sample_percentiles, window_to_uint8
from emflow.discover import SliceCatalog, SliceRef, discover_recipe
from emflow.enhance import clahe
from emflow.errors import OutputError, RecipeError, SourceError
from emflow.geometry import cut_slabs
from emflow.io.handoff import HandoffArray
from emflow.io.omezarr import OmeZarrWriter
from emflow.io.precomputed import PrecomputedWriter
from emflow.io.readers import read_image
from emflow.io.slicecache import load_slice
from emflow.io.writer import Writer
from emflow.lattice.execute import Progress, Unit, run_stage
from emflow.pyramid import Level, downsample_levels, plan_levels, steps_between
from emflow.recipe import OmeZarrOutput, PrecomputedOutput, Recipe

RUN_FOLDER = "emflow-run"
PARTIAL_SUFFIX = ".partial"
_GIB = 1 << 30


# ---------------------------------------------------------------------------------------
# planning (pure, in the driver)
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# unit functions (run on workers; arguments are small and picklable)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlabJob:
    """What one slab unit needs: its slices, how to render them, where to write."""

    z0: int
    refs: tuple[SliceRef, ...]
    shape_yx: tuple[int, int]
    frame_shape_yx: tuple[int, int]
    transforms: tuple[tuple[tuple[float, ...], ...] | None, ...]  # per slice 2x3 or None
    window: tuple[float, float] | None
    out_dtype: str
    clip_limit: float
    kernel_size_px: int
    levels: tuple[Level, ...]
    last_level: int
    writers: tuple[Any, ...]
    handoff: Any = None
    threads: int = 2
    in_dtype: str = "uint8"  # the source slices' dtype (from the catalog's headers)
    cache_dir: str | None = None  # decoded slices kept by the feature pass (zstd-1)
    source_index: tuple[int, ...] = ()  # per slice: catalog z whose pixels it shows (fill_previous)


def _load_slice(
    ref: SliceRef,
    shape_yx: tuple[int, int],
    dtype: np.dtype,
    cache_dir: str | None = None,
    cache_z: int | None = None,
) -> np.ndarray:
    if ref.fill == "zero" or ref.path is None:
        return np.zeros(shape_yx, dtype=dtype)
    if cache_dir is not None and cache_z is not None:
        cached = load_slice(cache_dir, cache_z, shape_yx, dtype)
        if cached is not None:
            return cached
    img = read_image(ref.path, ref.page)
    if img.shape != tuple(shape_yx) or img.dtype != dtype:
        raise SourceError(
            f"{ref.path} decodes to {img.shape[::-1]} {img.dtype}, but its header said "
            f"{tuple(shape_yx)[::-1]} {dtype}: the file is damaged; re-export it"
        )
    return img


def _render_slice(job: SlabJob, i: int, in_dtype: np.dtype) -> np.ndarray:
    """Decode, warp into the output frame, convert to the output dtype, and CLAHE one slice."""
    ref = job.refs[i]
    src_z = job.source_index[i] if job.source_index else None
    img = _load_slice(ref, job.shape_yx, in_dtype, job.cache_dir, src_z)
    matrix = job.transforms[i]
    if matrix is not None:
        img = warp_slice(img, np.asarray(matrix, dtype=np.float64), (0, 0), job.frame_shape_yx)
    if job.out_dtype == "uint8" and img.dtype != np.uint8:
        lo, hi = job.window or (0.0, 65535.0)
        img = window_to_uint8(img, lo, hi)
    if job.clip_limit > 0:
        img = clahe(
            img,
            origin_yx=(0, 0),
            frame_shape_yx=job.frame_shape_yx,
            kernel_size_px=job.kernel_size_px,
            clip_limit=job.clip_limit,
        )
    return img


def render_slab(job: SlabJob) -> dict:
    """Render one slab and write levels 0..last of it to every output; returns a small summary."""
    import cv2

    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    in_dtype = np.dtype(job.in_dtype)
    n = len(job.refs)
    slab = np.empty((n, *job.frame_shape_yx), dtype=job.out_dtype)

    def one(i: int) -> None:
        slab[i] = _render_slice(job, i, in_dtype)

    with ThreadPoolExecutor(max_workers=max(1, job.threads)) as pool:
        list(pool.map(one, range(n)))
    t_render = time.perf_counter()
    # level 0 is encoded and written by tensorstore's threads while the levels are computed
    pending = _start_writes(job.writers, job.levels, [slab], 0, job.z0, job.handoff, job.last_level)
    coarser = downsample_in_bands(slab, steps_between(job.levels, 0, job.last_level), job.threads)
    t_ds = time.perf_counter()
    pending += _start_writes(
        job.writers, job.levels, coarser, 1, job.z0, job.handoff, job.last_level
    )
    for fut in pending:
        fut.result()
    t_end = time.perf_counter()
    return {
        "z0": job.z0,
        "z1": job.z0 + n,
        "bytes_in": int(n * job.shape_yx[0] * job.shape_yx[1] * in_dtype.itemsize),
        "seconds": {"render": t_render - t0, "downsample": t_ds - t_render, "write": t_end - t_ds},
    }


def downsample_in_bands(
    block: np.ndarray, steps: Sequence[Sequence[int]], threads: int
) -> list[np.ndarray]:
    """:func:`~emflow.pyramid.downsample_levels` on y-bands in parallel threads (numpy frees the GIL).

    Bands start on multiples of the total y factor, so each band's levels are exactly the
    whole block's rows (chunked equals whole); results are concatenated along y.
    """
    if not steps:
        return []
    fy = int(np.prod([s[1] for s in steps]))
    ny = block.shape[1]
    band = -(-ny // max(1, threads))
    band = -(-band // fy) * fy
    if threads <= 1 or band >= ny:
        return downsample_levels(block, steps)
    cuts = [(y0, min(y0 + band, ny)) for y0 in range(0, ny, band)]
    with ThreadPoolExecutor(max_workers=len(cuts)) as pool:
        parts = list(pool.map(lambda c: downsample_levels(block[:, c[0] : c[1]], steps), cuts))
    return [np.concatenate([p[k] for p in parts], axis=1) for k in range(len(steps))]


def _start_writes(
    writers: Sequence[Any],
    levels: Sequence[Level],
    arrays: Sequence[np.ndarray],
    first: int,
    z0_first: int,
    handoff: Any,
    last: int,
) -> list[Any]:
    """Start writing arrays of levels ``first..`` (block at z0_first in level-``first`` voxels).

    Returns the pending write futures; the arrays must stay untouched until they resolve.
    """
    f0 = levels[first].factor_zyx[0]
    pending = []
    for offset, arr in enumerate(arrays):
        k = first + offset
        zk = z0_first * f0 // levels[k].factor_zyx[0]
        pending += [w.write(k, zk, arr) for w in writers]
        if handoff is not None and k == last:
            pending.append(handoff.write(zk, arr))
    return pending


@dataclass(frozen=True)
class CoarseJob:
    """One block of a coarse pass: read level ``source`` [z0, z1), write levels first..last."""

    z0: int
    z1: int
    source: int
    first: int
    last: int
    levels: tuple[Level, ...]
    writers: tuple[Any, ...]
    source_array: Any
    handoff: Any = None
    threads: int = 2


def build_coarse_block(job: CoarseJob) -> dict:
    """Downsample one block of the hand-off level into the coarse levels it owns."""
    t0 = time.perf_counter()
    block = job.source_array.read(job.z0, job.z1)
    arrays = downsample_in_bands(
        block, steps_between(job.levels, job.source, job.last), job.threads
    )
    # arrays[i] is level source+1+i (first == source + 1)
    for fut in _start_writes(
        job.writers, job.levels, arrays, job.first, _z_at(job), job.handoff, job.last
    ):
        fut.result()
    return {"z0": job.z0, "z1": job.z1, "level": job.source, "seconds": time.perf_counter() - t0}


def _z_at(job: CoarseJob) -> int:
    """z0 of the block in level ``source + 1`` voxels."""
    ratio = job.levels[job.source + 1].factor_zyx[0] // job.levels[job.source].factor_zyx[0]
    return job.z0 // ratio


def sample_window(refs: Sequence[SliceRef], percentiles: tuple[float, float]) -> dict:
    """Estimate a 16-bit → 8-bit window from up to 16 evenly spaced slices."""
    real = [r for r in refs if r.fill is None and r.path]
    picks = real[:: max(1, len(real) // 16)][:16]
    samples = [read_image(r.path, r.page)[::4, ::4] for r in picks]
    lo, hi = sample_percentiles(samples, percentiles)
    return {"window": [lo, hi], "slices": [r.z for r in picks]}


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run produced: output paths, plan, timings, unit counts."""

    output_paths: dict[str, Path]
    run_dir: Path
    plan: Plan
    catalog: SliceCatalog
    seconds: float
    bytes_in: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    alignment: Any = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / max(self.seconds, 1e-9)


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".emflow-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output_dir {root} is not writable ({exc.strerror or exc}); choose a directory you can write to"
        ) from None


def _cluster_resources(client: Any) -> tuple[int, int]:
    """(total threads, memory per thread in bytes) of the cluster, or of this machine."""
    if client is None:
        return 2, 4 * _GIB
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    workers = info.get("workers", {}).values()
    threads = sum(w.get("nthreads", 1) for w in workers) or 1
    mem = (
        min((w.get("memory_limit") or 4 * _GIB) / max(1, w.get("nthreads", 1)) for w in workers)
        if workers
        else 4 * _GIB
    )
    return threads, int(mem)


def _accepts_n_workers(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def run(
    recipe: Recipe,
    *,
    client: Any = None,
    restart: bool = False,
    progress: bool | None = None,
    log: Any = None,
    alignment_path: str | Path | None = None,
) -> RunResult:
    """Run a whole ingest: discover → (align) → slabs → coarse levels → finalize.

    ``client=None`` runs every unit here, in order (notebooks, debugging).
    ``alignment_path`` re-exports with a saved alignment.json instead of matching again.
    """
    from emflow import lattice

    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    root = recipe.output_path
    _check_writable(root)
    run_dir = root / RUN_FOLDER
    catalog = discover_recipe(recipe)
    say(f"discovered {catalog.summary()}")
    saved_alignment = None
    if alignment_path is not None:  # read it before the run folder is touched (--restart wipes it)
        from emflow.align_stage import load_alignment

        saved_alignment = load_alignment(Path(alignment_path), catalog)
    resuming = lattice.open_run(run_dir, recipe.output_fingerprint(), restart=restart)
    (run_dir / "COMPLETE").unlink(missing_ok=True)
    (run_dir / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    run_id = recipe.output_fingerprint()
    threads, mem_per_thread = _cluster_resources(client)
    stage_seconds: dict[str, float] = {}

    def stage(name: str, units: list[Unit]) -> dict[int, Any]:
        t = time.perf_counter()
        prog = Progress(name, len(units), enabled=progress)
        res = run_stage(
            name,
            units,
            client=client,
            run_id=run_id,
            retries=recipe.run.retries,
            progress=prog,
            run_dir=run_dir,
        )
        stage_seconds[name] = time.perf_counter() - t
        return res

    # 16-bit window
    window: tuple[float, float] | None = None
    if catalog.dtype == "uint16" and recipe.depth.output == "uint8":
        if recipe.depth.window is not None:
            window = recipe.depth.window
        else:
            res = stage(
                "stats", [Unit(0, sample_window, (catalog.slices, recipe.depth.percentiles))]
            )
            window = tuple(res[0]["window"])  # type: ignore[assignment]
        say(f"16-bit window {window[0]:g}..{window[1]:g} → 0..255")

    # alignment
    alignment = None
    transforms: list[Any] = [None] * len(catalog.slices)
    frame = catalog.shape_yx
    refs = list(catalog.slices)
    source_index = list(range(len(refs)))
    if alignment_path is not None or recipe.align.enabled:
        from emflow.align_stage import align_stack

        if saved_alignment is not None:
            alignment = saved_alignment
            say(f"alignment from {alignment_path} (no feature matching)")
        else:
            alignment = align_stack(recipe, catalog, run_dir, stage, say)
        frame = tuple(alignment.frame_shape_yx)  # type: ignore[assignment]
        for i, ref in enumerate(catalog.slices):
            m = alignment.transforms.get(ref.z)
            transforms[i] = (
                None if m is None else tuple(tuple(float(v) for v in row) for row in np.asarray(m))
            )
            src = alignment.source_slice(ref.z)
            if src is None:
                refs[i] = SliceRef(ref.z, ref.source_z, None, 0, fill="zero")
            elif src != ref.z:
                other = catalog.slices[src]
                refs[i] = SliceRef(ref.z, ref.source_z, other.path, other.page, fill="previous")
                source_index[i] = src
    cache_dir = None
    if recipe.align.enabled and alignment_path is None and recipe.run.cache_decoded:
        from emflow.align_stage import slice_cache_dir

        cache_dir = str(slice_cache_dir(run_dir))
    plan = plan_output(
        recipe,
        len(catalog.slices),
        frame,
        catalog.dtype,
        threads=threads,
        memory_per_thread=mem_per_thread,
    )
    say(plan.summary())
    writers = make_writers(recipe, plan, root, token=run_id + uuid.uuid4().hex[:6])
    check_ownership(plan, writers)
    if not resuming:
        for w in writers:
            w.create()
    handoffs = []
    for p in plan.passes[:-1]:
        h = HandoffArray(
            run_dir / "handoff" / f"level{p.last}",
            plan.levels[p.last].shape_zyx,
            plan.out_dtype,
            token=run_id,
        )
        if not resuming:
            h.create()
        handoffs.append(h)
    # slabs
    p0 = plan.passes[0]
    slab_units = []
    for i, (z0, z1) in enumerate(p0.blocks):
        job = SlabJob(
            z0=z0,
            refs=tuple(refs[z0:z1]),
            shape_yx=catalog.shape_yx,
            frame_shape_yx=frame,
            transforms=tuple(transforms[z0:z1]),
            window=window,
            out_dtype=plan.out_dtype,
            clip_limit=recipe.enhance.clip_limit,
            kernel_size_px=recipe.enhance.kernel_size_px,
            levels=plan.levels,
            last_level=p0.last,
            writers=tuple(writers),
            handoff=handoffs[0] if handoffs else None,
            threads=2 if threads <= 2 else 1,
            in_dtype=catalog.dtype,
            cache_dir=cache_dir,
            source_index=tuple(source_index[z0:z1]),
        )
        nbytes = (
            (z1 - z0)
            * catalog.shape_yx[0]
            * catalog.shape_yx[1]
            * (2 if catalog.dtype == "uint16" else 1)
        )
        slab_units.append(Unit(i, render_slab, (job,), nbytes))
    stage("slab", slab_units)
    for p in plan.passes[1:]:
        units = []
        for i, (z0, z1) in enumerate(p.blocks):
            job = CoarseJob(
                z0,
                z1,
                p.source,
                p.first,
                p.last,
                plan.levels,
                tuple(writers),
                handoffs[p.index - 1],
                handoffs[p.index] if p.index < len(handoffs) else None,
                threads=2 if threads <= 2 else 1,
            )
            units.append(Unit(i, build_coarse_block, (job,)))
        stage(f"coarse{p.index}", units)
    # finalize: metadata, then move complete volumes into place
    out_paths: dict[str, Path] = {}
    for w in writers:
        final = root / w.name
        out_paths[w.name] = final
        if not Path(w.path).exists() and final.exists():
            continue  # resumed after an earlier run had already finalised this output
        w.finalize()
        if final.exists():
            shutil.rmtree(final)
        Path(w.path).rename(final)
    shutil.rmtree(run_dir / "handoff", ignore_errors=True)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    from emflow.io.tsopen import forget

    forget(run_id)
    seconds = time.perf_counter() - t_start
    (run_dir / "COMPLETE").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {seconds:.1f} s\n")
    return RunResult(
        out_paths, run_dir, plan, catalog, seconds, catalog.nbytes, stage_seconds, alignment
    )
