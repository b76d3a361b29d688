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

import contextlib
import logging
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emflow import interrupts
from emflow.discover import SliceCatalog, SliceRef
from emflow.errors import ClusterError, NoSpaceError, no_space
from emflow.finalize import (
    OwnedVolume,
    record_resolved,
    resolved_values,
    tidy_run_folder,
)
from emflow.io import ownership, rendercache, runmirror
from emflow.io.handoff import HandoffArray
from emflow.io.location import Location, is_url, join, remove_tree
from emflow.lattice.execute import Progress, Unit, declare_plan, run_stage
from emflow.plan import (  # noqa: F401  (re-exported: emflow.pipeline names used before the split)
    _GIB,
    PARTIAL_SUFFIX,
    RUN_FOLDER,
    Pass,
    Plan,
    check_ownership,
    load_plan,
    make_writers,
    plan_output,
    windowed_stack,
)
from emflow.preflight import Preflight, preflight
from emflow.recipe import Recipe
from emflow.render import (  # noqa: F401  (re-exported, as above)
    BrickJob,
    SliceJob,
    SliceRender,
    build_brick,
    downsample_in_bands,
    render_slices,
    sample_window,
)
from emflow.resume import open_volumes
from emflow.source_fingerprint import write_stack_fingerprint

logger = logging.getLogger(__name__)


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

    def summary(self) -> str:
        """Time, stages, alignment (pairs matched/failed/rejected), outputs, run folder."""
        from emflow.reprs import run_text

        return "\n".join(run_text(self))

    def _repr_html_(self) -> str:
        from emflow.reprs import run_html

        return run_html(self)

    @property
    def pair_summary(self) -> dict[str, dict[str, int]] | None:
        """Alignment pairs by kind (neighbour / second / bridge) and status (matched / failed /
        rejected), as on the console; None when the run did not match pairs."""
        summary = getattr(self.alignment, "pair_summary", None)
        return summary() if callable(summary) and self.alignment.pairs else None


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


PYRAMID_STAGES = ("render", "slab", "coarse")


def plan_for_run(
    recipe: Recipe,
    run_dir: Path,
    n_slices: int,
    frame_shape_yx: tuple[int, int],
    in_dtype: str,
    resuming: bool,
    *,
    windowed: bool = False,
) -> tuple[Plan, bool]:
    """The plan this run executes and whether its units resume: the stored plan when resuming,
    else a new one (stored).

    Units are numbered within the plan, so a resumed run must execute the plan its done
    markers refer to, whatever the cluster now looks like. A run folder from before plans
    were stored (or holding a plan of another frame) redoes its pyramid stages.
    """
    if resuming:
        old = load_plan(run_dir)
        if (
            old is not None
            and old.frame_shape_yx == tuple(frame_shape_yx)
            and old.levels[0].shape_zyx[0] == n_slices
            and old.in_dtype == in_dtype
        ):
            return old, True
    plan = plan_output(recipe, n_slices, frame_shape_yx, in_dtype, windowed=windowed)
    markers = run_dir / "done"
    if markers.is_dir():  # markers of another plan's units must not be reused
        for d in markers.iterdir():
            if d.name.startswith(PYRAMID_STAGES):
                shutil.rmtree(d, ignore_errors=True)
    if runmirror.for_dir(run_dir) is not None:  # the bucket stops vouching for them first
        runmirror.for_dir(run_dir).flush()
    for w in ("handoff", rendercache.FOLDER):
        remove_tree(runmirror.data_path(run_dir, w))
    plan.save(run_dir)
    return plan, False


def _drop_lost_renders(run_dir: Path, plan: Plan) -> None:
    """Render units whose rendered slices are gone (the copy is deleted when a run completes)
    run again if a pass-0 unit still needs them (e.g. an output volume was recreated)."""
    from emflow.lattice import done_markers, marker_path

    if len(done_markers(run_dir, plan.passes[0].stage)) == plan.passes[0].n_units:
        return
    folder = runmirror.data_path(run_dir, rendercache.FOLDER)
    if is_url(folder):
        have = {key.rsplit("/", 1)[-1] for key in Location.of(folder).list()}
    else:
        have = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for i in done_markers(run_dir, "render"):
        z0, z1 = plan.render_slices(i)
        if any(rendercache.slice_path(folder, z).name not in have for z in range(z0, z1)):
            marker_path(run_dir, "render", i).unlink(missing_ok=True)


def _data_path(run_dir: Path, name: str, *more: str) -> Path | str:
    """A run-folder intermediate: inside ``run_dir``, or in the bucket for a mirrored run
    folder (:func:`emflow.io.runmirror.data_path`: workers have no shared disk)."""
    where = runmirror.data_path(run_dir, name)
    return join(where, *more) if is_url(where) else Path(where, *more)


def check_worker_memory(client: Any, plan: Plan) -> None:
    """Refuse to start when the connected workers have less memory per thread than a unit needs."""
    if client is None:
        return
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    except TypeError:
        workers = client.scheduler_info().get("workers", {}).values()
    per = [
        w["memory_limit"] / max(1, w.get("nthreads", 1)) for w in workers if w.get("memory_limit")
    ]
    need = plan.memory_per_unit
    if per and min(per) < need:
        raise ClusterError(
            f"workers have {min(per) / _GIB:.2f} GiB per thread, but units of this plan need up to "
            f"{need / _GIB:.2f} GiB (emflow plan lists them); set run.memory_per_worker (and "
            "run.threads_per_worker) in the recipe to what workers have, so the plan cuts smaller "
            "units, or give workers more memory"
        )


def pyramid_stages(
    recipe: Recipe,
    plan: Plan,
    how: SliceRender,
    slices: list[SliceJob],
    root: Path,
    run_dir: Path,
    run_id: str,
    stage: Any,
    *,
    threads: int,
    owner: str,
) -> list[Any]:
    """Open or create the outputs and hand-offs (every run), run the render stage and every
    pass; return the writers.

    An output volume is created only inside a folder made by emflow (its ownership marker
    first, :class:`emflow.finalize.OwnedVolume`); ``owner`` is the output_dir's owner id.
    """
    writers = make_writers(recipe, plan, root, token=run_id + uuid.uuid4().hex[:6])
    check_ownership(plan, writers)
    handoffs: dict[int, HandoffArray] = {}
    producers: list[tuple[HandoffArray, str]] = []
    for p in plan.passes:
        if p.handoff is None:
            continue
        h = p.handoff
        fs, fh = plan.levels[p.source].factor_zyx, plan.levels[h].factor_zyx
        chunk = tuple(
            plan.levels[h].shape_zyx[a] if p.grid_zyx[a] == 1 else p.brick_zyx[a] * fs[a] // fh[a]
            for a in range(3)
        )
        arr = HandoffArray(
            _data_path(run_dir, "handoff", f"level{h}"),
            plan.levels[h].shape_zyx,
            plan.handoff_dtype(h),
            chunk,  # type: ignore[arg-type]
            token=run_id,
        )
        handoffs[h] = arr
        producers.append((arr, p.stage))
    from emflow.lattice import done_markers

    finalized = {writers[i].name for i in done_markers(run_dir, "finalize") if i < len(writers)}

    def open_outputs() -> None:
        dropped = open_volumes(
            run_dir,
            plan,
            [OwnedVolume(w, owner) for w in writers],
            producers,
            stages=[p.stage for p in plan.passes],
            finalized=finalized,
            root=root,
            fingerprint=run_id,
        )
        if dropped:
            logger.info("output volumes (re)created: units of %s run again", ", ".join(dropped))

    # the outputs are created while the render stage runs (the driver only waits there), when
    # nothing they could drop matters to it: a local output_dir and no pass-0 unit done yet
    # (which units _drop_lost_renders re-renders then does not depend on dropped markers)
    overlap = (
        plan.render_stage
        and not is_url(str(root))
        and runmirror.for_dir(run_dir) is None
        and not done_markers(run_dir, plan.passes[0].stage)
    )
    render_dir = None
    with ThreadPoolExecutor(1, thread_name_prefix="emflow-open-outputs") as pool:
        opening = pool.submit(open_outputs) if overlap else None
        if opening is None:
            open_outputs()
        if plan.render_stage:
            render_dir = str(runmirror.data_path(run_dir, rendercache.FOLDER))
            _drop_lost_renders(run_dir, plan)
            per_slice = how.shape_yx[0] * how.shape_yx[1] * (2 if how.in_dtype == "uint16" else 1)
            # the render stage is the decoded-slice cache's last reader (unless run.keep keeps it)
            drop_cached = "slice_cache" not in recipe.run.keep
            units = []
            for i in range(plan.render_units):
                z0, z1 = plan.render_slices(i)
                args = (how, slices[z0:z1], render_dir, drop_cached)
                units.append(Unit(i, render_slices, args, per_slice * (z1 - z0)))
            stage("render", units)
        if opening is not None:
            opening.result()  # its error, if any (the render stage's own comes first)
    for p in plan.passes:
        units = []
        for i in range(p.n_units):
            box = p.box(i)
            first = p.index == 0
            job = BrickJob(
                index=i,
                box=box,
                source=p.source,
                last=p.last,
                handoff_level=p.handoff,
                levels=plan.levels,
                writers=tuple(writers),
                out_dtype=plan.out_dtype,
                handoff=handoffs.get(p.handoff) if p.handoff is not None else None,
                source_array=None if first else handoffs[p.source],
                how=how if first else None,
                slices=tuple(slices[box[0] : box[1]]) if first and render_dir is None else (),
                render_dir=render_dir if first else None,
                threads=threads,
            )
            units.append(Unit(i, build_brick, (job,), job.bytes_in))
        stage(p.stage, units)
    return writers


def _labels(p: Pass) -> list[str] | None:
    """Dashboard labels of a pass's units: the z range (and y/x range of partial frames)."""
    if p.n_units > 20_000:
        return None
    level = "" if p.index == 0 else f" (level {p.source})"
    out = []
    for z0, z1, y0, y1, x0, x1 in p.blocks:
        where = "" if p.full_frame else f" y {y0}-{y1 - 1} x {x0}-{x1 - 1}"
        out.append(f"z {z0}-{z1 - 1}{where}{level}")
    return out


def planned_stages(
    recipe: Recipe,
    catalog: SliceCatalog,
    plan: Plan,
    *,
    stats: bool,
    aligning: bool,
) -> list[dict[str, Any]]:
    """Every stage of a run in order, with its unit count and unit labels (z ranges).

    ``stats`` (16-bit window), ``features``/``match``/``match2``/``solve``/``qc`` (alignment),
    ``render``
    (when the plan has it), ``slab``, ``coarse<N>``, ``finalize`` (one unit per output).
    """
    n = len(catalog.slices)
    out: list[dict[str, Any]] = []
    if stats:
        out.append({"stage": "stats", "total": 1})
    if aligning:
        # neighbours, then second neighbours and bridges (their count is known once the
        # neighbours are matched), the solve, and the QC of every matched pair
        out.append({"stage": "features", "total": n})
        labels = [f"z {z}→{z + 1}" for z in range(n - 1)] if n <= 20_000 else None
        out.append({"stage": "match", "total": max(0, n - 1), "labels": labels})
        out.append({"stage": "match2", "total": max(0, n - 2)})
        out.append({"stage": "solve", "total": 1})
        out.append({"stage": "qc", "total": max(0, 2 * n - 3)})
    if plan.render_stage:
        out.append({"stage": "render", "total": plan.render_units})
    for p in plan.passes:
        out.append({"stage": p.stage, "total": p.n_units, "labels": _labels(p)})
    names = [o.name for o in recipe.outputs]
    out.append({"stage": "finalize", "total": len(names), "labels": names})
    return out


def finalize_output(writer: Any, final: str, owner: str) -> dict:
    """Write the metadata that marks an output complete and move it into place (a unit).

    Idempotent: an output already moved into place (``.partial`` gone, final there) by
    a run that died before recording it is left as it is. An earlier ``final`` is
    replaced only if emflow wrote it for this output_dir (:mod:`emflow.io.ownership`).
    """
    from emflow.io import bucket
    from emflow.io.location import is_url

    if is_url(str(writer.path)):  # a bucket: no rename, the metadata is published last
        return bucket.publish(writer)
    partial, dest = Path(writer.path), Path(final)
    if not partial.exists() and ownership.is_owned(dest, owner):
        return {"output": writer.name, "path": str(dest), "moved": False}
    writer.finalize()
    ownership.replace(partial, dest, owner)
    return {"output": writer.name, "path": str(dest), "moved": True}


def claim_run_folder(recipe: Recipe) -> str:
    """Claim the run folder (its ownership marker first) and return the output_dir's owner id;
    for a bucket output_dir the owner id is kept in the bucket's run folder too."""
    if recipe.output_remote:
        from emflow.io import bucket

        return bucket.claim_run_folder(str(recipe.output_root), recipe.run_folder)
    return ownership.claim_run_folder(recipe.run_folder)


def _qc_written(pending: list[Any], *, quiet: bool = False) -> None:
    """Wait for the qc/ files of the alignment (:func:`emflow.align_stage.wait_written`)."""
    if pending:
        from emflow.align_stage import wait_written

        wait_written(pending, quiet=quiet)


def _warm_up_workers(client: Any) -> None:
    """One fire-and-forget import task per connected worker (see :func:`emflow.render.warm_up`)."""
    from distributed import fire_and_forget

    from emflow.render import warm_up

    tag = uuid.uuid4().hex[:8]
    for i, address in enumerate(client.scheduler_info().get("workers", {})):
        fut = client.submit(warm_up, key=f"warm-up-{tag}-{i}", workers=[address], pure=False)
        fire_and_forget(fut)


def run(
    recipe: Recipe,
    *,
    client: Any = None,
    restart: bool = False,
    progress: bool | None = None,
    log: Any = None,
    alignment_path: str | Path | None = None,
    checked: Preflight | None = None,
) -> RunResult:
    """Run a whole ingest: discover → (align) → slabs → coarse levels → finalize.

    ``client=None`` runs every unit here, in order (notebooks, debugging).
    ``alignment_path`` re-exports with a saved alignment.json instead of matching again.
    Any point of a run is a safe place to stop: running it again continues from there.
    ``checked`` is the :func:`~emflow.preflight.preflight` of this recipe if the caller
    already made it; otherwise it is made here. Nothing is written before it passed.
    """
    from emflow import lattice

    if client is not None and recipe.storage is not None:  # endpoint, profile...: no keys
        from emflow.cluster.storage import share_settings

        share_settings(client, recipe.storage)
    if client is not None:
        # the lattice's plugins first, while workers are idle (busy importing, they answer
        # late); then workers import while the driver checks, discovers and plans
        with contextlib.suppress(Exception):  # declare_plan tries again and says why
            lattice.ensure_plugin(client)
        _warm_up_workers(client)
    say = log or (lambda msg: None)
    check = checked or preflight(recipe, restart=restart, alignment_path=alignment_path)
    catalog, run_dir = check.catalog, check.run_dir
    say(f"discovered {catalog.summary()}")
    saved_alignment = check.alignment  # read before the run folder is touched (--restart wipes it)
    # a bucket output_dir: the run folder is the bucket's, worked on in a local copy (restored
    # by the preflight) that every stage boundary copies back (emflow.io.runmirror)
    mirror = runmirror.for_recipe(recipe)
    owner = claim_run_folder(recipe)  # the first write: run folder, its marker first
    try:
        resuming = lattice.open_run(run_dir, recipe.output_fingerprint(), restart=restart)
        write_stack_fingerprint(run_dir, check.stack)
    except BaseException:
        runmirror.close(run_dir)
        raise
    try:
        if client is not None:
            try:
                lattice.announce_run(client, run_dir, recipe.output_fingerprint())
            except Exception:  # pragma: no cover - the run goes on without emflow status
                logger.warning("could not record the live run in %s", run_dir, exc_info=True)
        with interrupts.remembered():  # a Ctrl-C a library callback swallowed is not lost
            return _run(
                recipe, catalog, run_dir, client, progress, say, alignment_path,
                saved_alignment, resuming, owner,
            )  # fmt: skip
    finally:
        lattice.retire_run(run_dir)
        if mirror is not None and not runmirror.store_down(sys.exc_info()[1]):
            try:  # what the last stage left (COMPLETE, tidied intermediates) reaches the bucket
                mirror.flush()
            except Exception as exc:  # an error of the run itself is the one to report
                logger.warning("could not copy the run folder to %s: %s", mirror.remote.url, exc)
        if mirror is not None:
            runmirror.close(run_dir)


def _run(
    recipe: Recipe,
    catalog: SliceCatalog,
    run_dir: Path,
    client: Any,
    progress: bool | None,
    say: Any,
    alignment_path: str | Path | None,
    saved_alignment: Any,
    resuming: bool,
    owner: str,
) -> RunResult:
    t_start = time.perf_counter()
    root = recipe.output_root  # a local folder, or a bucket URL
    (run_dir / "COMPLETE").unlink(missing_ok=True)
    (run_dir / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    run_id = recipe.output_fingerprint()
    threads, _ = _cluster_resources(client)
    stage_seconds: dict[str, float] = {}
    planned: list[dict[str, Any]] = []

    def stage(name: str, units: list[Unit], **kw: Any) -> dict[int, Any]:
        t = time.perf_counter()
        prog = Progress(name, len(units), enabled=progress)
        labels = next((s.get("labels") for s in planned if s["stage"] == name), None)
        try:
            res = run_stage(
                name,
                units,
                client=client,
                run_id=run_id,
                retries=recipe.run.retries,
                progress=prog,
                run_dir=run_dir,
                labels=labels,
                **kw,
            )
        except NoSpaceError as exc:
            if exc.path is None and str(root) not in str(exc):  # say where (the error could not)
                raise no_space(f"under {root}") from exc
            raise
        stage_seconds[name] = time.perf_counter() - t
        return res

    needs_stats = (
        catalog.dtype == "uint16" and recipe.depth.output == "uint8" and recipe.depth.window is None
    )
    aligning = recipe.align.enabled and alignment_path is None

    def announce(plan: Plan) -> None:
        planned[:] = planned_stages(recipe, catalog, plan, stats=needs_stats, aligning=aligning)
        declare_plan(planned, client=client, run_id=run_id, run_dir=run_dir)

    # the whole run from the start: the stored plan of a resumed run, else the plan for the
    # source frame (pyramid unit counts may change once the alignment fixed the frame)
    frame = catalog.shape_yx
    if saved_alignment is not None:
        frame = tuple(saved_alignment.frame_shape_yx)  # type: ignore[assignment]
    early = load_plan(run_dir) if resuming else None
    announce(early or plan_output(recipe, len(catalog.slices), frame, catalog.dtype))

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
        say(f"16-bit window {window[0]!r}..{window[1]!r} → 0..255 (exact values in run.json)")

    # alignment
    alignment = None
    transforms: list[Any] = [None] * len(catalog.slices)
    qc_files: list[Any] = []  # the qc/ files a driver thread writes while the workers render
    refs = list(catalog.slices)
    source_index = list(range(len(refs)))
    if alignment_path is not None or recipe.align.enabled:
        from emflow.align_stage import align_stack

        if saved_alignment is not None:
            alignment = saved_alignment
            say(f"alignment from {alignment_path} (no feature matching)")
        else:
            alignment = align_stack(recipe, catalog, run_dir, stage, say, pending=qc_files)
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
    try:
        cache_dir = None
        if recipe.align.enabled and alignment_path is None and recipe.run.cache_decoded:
            from emflow.align_stage import slice_cache_dir

            cache_dir = str(slice_cache_dir(run_dir))
        windowed = windowed_stack(recipe, catalog.slices, alignment is not None)
        plan, resuming = plan_for_run(
            recipe, run_dir, len(catalog.slices), frame, catalog.dtype, resuming,
            windowed=windowed,
        )  # fmt: skip
        say(plan.summary())
        announce(plan)
        check_worker_memory(client, plan)
        record_resolved(run_dir, **resolved_values(recipe, plan, window, alignment, catalog))
        how = SliceRender(
            shape_yx=catalog.shape_yx,
            frame_shape_yx=frame,
            window=window,
            out_dtype=plan.out_dtype,
            clip_limit=recipe.enhance.clip_limit,
            kernel_size_px=recipe.enhance.kernel_size_px,
            in_dtype=catalog.dtype,
            cache_dir=cache_dir,
        )
        shown = Counter(source_index)  # a cached slice shown by one z only may go once rendered
        slices = [
            SliceJob(refs[i], transforms[i], source_index[i], shown[source_index[i]] == 1)
            for i in range(len(refs))
        ]
        writers = pyramid_stages(
            recipe, plan, how, slices, root, run_dir, run_id, stage,
            threads=2 if threads <= 2 else 1, owner=owner,
        )  # fmt: skip
    except BaseException:
        _qc_written(qc_files, quiet=True)
        raise
    _qc_written(qc_files)  # every qc/ file is written before the outputs are finalized
    # every pass is done: no unit reads the rendered copy again (a resumed run renders again
    # only for pass-0 units not done), so a local one is deleted while the outputs finalize
    tidy_rendered = (
        plan.render_stage and not recipe.output_remote and runmirror.for_dir(run_dir) is None
    )
    # finalize: metadata, then move complete volumes into place (a unit per output)
    out_paths = {
        w.name: f"{root}/{w.name}" if recipe.output_remote else root / w.name for w in writers
    }
    with ThreadPoolExecutor(1, thread_name_prefix="emflow-tidy-rendered") as pool:
        tidying = (
            pool.submit(tidy_run_folder, run_dir, recipe.run.keep, only=("rendered",))
            if tidy_rendered
            else None
        )
        stage(
            "finalize",
            [
                Unit(i, finalize_output, (w, str(out_paths[w.name]), owner))
                for i, w in enumerate(writers)
            ],
            where="driver",
        )
        removed = tidying.result() if tidying is not None else []
    removed = tidy_run_folder(run_dir, recipe.run.keep) + removed
    if removed:
        say(f"removed intermediates from {run_dir}: {', '.join(removed)} (run.keep keeps them)")
    from emflow.io.tsopen import forget

    forget(run_id)
    seconds = time.perf_counter() - t_start
    (run_dir / "COMPLETE").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {seconds:.1f} s\n")
    return RunResult(
        out_paths, run_dir, plan, catalog, seconds, catalog.nbytes, stage_seconds, alignment
    )
