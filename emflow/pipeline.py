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

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emflow.discover import SliceCatalog, SliceRef, discover_recipe
from emflow.errors import OutputError
from emflow.io.handoff import HandoffArray
from emflow.lattice.execute import Progress, Unit, run_stage
from emflow.plan import (  # noqa: F401  (re-exported: emflow.pipeline names used before the split)
    _GIB,
    PARTIAL_SUFFIX,
    RUN_FOLDER,
    Pass,
    Plan,
    check_ownership,
    make_writers,
    plan_output,
)
from emflow.recipe import Recipe
from emflow.render import (  # noqa: F401  (re-exported, as above)
    CoarseJob,
    SlabJob,
    build_coarse_block,
    downsample_in_bands,
    render_slab,
    sample_window,
)


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
