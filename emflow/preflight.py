"""Everything a run would refuse, checked before anything is written (``emflow validate`` = this).

:func:`preflight` discovers the stack and checks, in order: the slices (headers,
truncation, memory for one slice), the recipe against the stack (JPEG needs uint8,
pyramid levels vs slice size), a ``--alignment`` file, the cluster request, and
the output location: output_dir writable, the run folder and every output either
absent or provably emflow's own (:mod:`emflow.io.ownership`), no overlap between
outputs and sources, and an earlier run in the folder made from the same recipe
and the same stack (else ``--restart``). ``emflow run`` calls it first, so a
refused run leaves no trace; ``emflow validate`` calls it and stops.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emflow.discover import SliceCatalog, discover_recipe
from emflow.errors import AlignmentError, ClusterError, OutputError, RecipeError, SourceError
from emflow.io import ownership
from emflow.recipe import PARTIAL_SUFFIX, RUN_FOLDER, PrecomputedOutput, Recipe, parse_memory
from emflow.source_fingerprint import read_stack_fingerprint, stack_changes, stack_fingerprint

RUN_JSON = "run.json"  # the run folder's record of the recipe fingerprint (emflow.lattice)
#: below this many px per side SIFT finds (next to) no keypoints: alignment cannot work
MIN_ALIGN_PX = 32


@dataclass(frozen=True)
class Preflight:
    """The checked run: discovered stack, resolved paths and what the run folder holds."""

    recipe: Recipe
    catalog: SliceCatalog
    output_dir: Path | str  # a local folder, or a bucket URL
    run_dir: Path
    owner: str | None  # owner id of an existing run folder, None for a new one
    out_dtype: str
    restart: bool = False
    resuming: bool = False  # the run folder holds a run of this recipe and stack
    alignment: Any = None  # the loaded --alignment file
    stack: dict[str, Any] = field(default_factory=dict)  # the stack fingerprint
    notes: tuple[str, ...] = ()  # advice that does not stop the run (e.g. free space)

    def output_paths(self) -> dict[str, Path | str]:
        if isinstance(self.output_dir, str):  # a bucket URL
            return {o.name: f"{self.output_dir}/{o.name}" for o in self.recipe.outputs}
        return {o.name: self.output_dir / o.name for o in self.recipe.outputs}


def out_dtype_of(recipe: Recipe, in_dtype: str) -> str:
    """The output dtype: uint16 only when asked for and the input is 16-bit."""
    return "uint16" if (recipe.depth.output == "uint16" and in_dtype == "uint16") else "uint8"


def preflight(
    recipe: Recipe,
    *,
    restart: bool = False,
    alignment_path: str | Path | None = None,
    cluster_request: Any = None,
    catalog: SliceCatalog | None = None,
) -> Preflight:
    """Check everything a run needs; raise the one-line EmflowError a run would end with.

    Nothing is created or modified (a bucket output_dir gets one probe object, written and
    deleted: the only request that proves credentials and write permission).
    ``cluster_request`` (a ClusterRequest) is checked without starting anything.
    """
    check_environment(recipe)
    if recipe.storage is not None:  # the recipe's object-store settings, for this process
        from emflow.cluster.storage import apply

        apply(recipe.storage.model_dump(mode="json"))
    if recipe.output_remote:  # wrong credentials, missing bucket, store down: before any work
        from emflow.io import bucket

        bucket.probe(str(recipe.output_root))
    catalog = catalog if catalog is not None else discover_recipe(recipe)
    out_dtype = out_dtype_of(recipe, catalog.dtype)
    _check_encoding(recipe, catalog, out_dtype)
    _check_levels(recipe, catalog)
    _check_memory(recipe, catalog, out_dtype)
    _check_plan(recipe, catalog)
    if alignment_path is None:
        _check_alignable(recipe, catalog)
    _check_cluster(cluster_request)
    alignment = _load_alignment(alignment_path, catalog) if alignment_path is not None else None
    root = recipe.output_root
    run_dir = recipe.run_folder
    if recipe.output_remote:
        from emflow.io import bucket

        owner = bucket.bucket_owner(str(root))
        for o in recipe.outputs:
            bucket.check_output(f"{root}/{o.name}", owner)
        from emflow.io import runmirror

        runmirror.for_recipe(recipe).restore()  # the driver's working copy := the bucket's
    else:
        _check_writable(root)
        owner = _check_run_folder(run_dir)
        _check_overlap(recipe, catalog, root)
        _check_outputs(recipe, root, owner)
    stack = stack_fingerprint(catalog)
    resuming = _check_earlier_run(recipe, run_dir, stack, restart)
    return Preflight(
        recipe,
        catalog,
        root,
        run_dir,
        owner,
        out_dtype,
        restart=restart,
        resuming=resuming,
        alignment=alignment,
        stack=stack,
        notes=() if recipe.output_remote else tuple(_space_notes(root, catalog, recipe)),
    )


def bucket_locations(recipe: Recipe) -> list[str]:
    """The s3:// and gs:// URLs a recipe reads or writes (sources, output_dir): the requests
    that carry credentials (plain HTTP sources carry none)."""
    src = recipe.source
    named = (src.glob, src.pattern, src.directory, recipe.output_dir)
    return [str(u) for u in named if isinstance(u, str) and u.startswith(("s3://", "gs://"))]


def check_environment(recipe: Recipe) -> None:
    """Refuse a run that talks to a bucket while tensorstore would print request headers.

    ``TENSORSTORE_CURL_VERBOSE`` (or ``TENSORSTORE_VERBOSE_LOGGING`` with ``curl``) makes
    every process print each request's headers, signed credentials included, to the
    terminal and the worker logs. Refused rather than silently dropped: the user asked for
    that output, and a worker started elsewhere (SLURM, Kubernetes) may not inherit a drop.
    """
    urls = bucket_locations(recipe)
    if not urls:
        return
    from emflow.errors import UnsafeEnvironment
    from emflow.io import storage

    name = storage.leaky_environment()
    if name is not None:
        raise UnsafeEnvironment(
            f"{name} is set: tensorstore would print the headers of every request to "
            f"{urls[0]}, credentials included; unset it (`unset {name}`) and run again"
        )


# ---- the recipe against the stack ----------------------------------------------------
def _check_encoding(recipe: Recipe, catalog: SliceCatalog, out_dtype: str) -> None:
    for i, o in enumerate(recipe.outputs):
        if isinstance(o, PrecomputedOutput) and o.encoding == "jpeg" and out_dtype != "uint8":
            raise RecipeError(
                f"field 'outputs.{i}.encoding': JPEG needs 8-bit output but depth.output is "
                f"{out_dtype} ({catalog.dtype} slices); set depth.output to uint8 or use "
                "encoding 'raw'"
            )


def _check_levels(recipe: Recipe, catalog: SliceCatalog) -> None:
    from emflow.pyramid import plan_levels

    asked = recipe.pyramid.levels
    if asked is None:
        return
    possible = plan_levels(catalog.shape_zyx, recipe.voxel_size_nm, (1, 1, 1), None)
    if asked > len(possible):
        z, y, x = catalog.shape_zyx
        raise RecipeError(
            f"field 'pyramid.levels': {asked} levels asked, but a stack of {x} × {y} × {z} px "
            f"reaches a single voxel after {len(possible)}; use at most {len(possible)} or "
            "leave it out (default: until one chunk)"
        )


def _check_plan(recipe: Recipe, catalog: SliceCatalog) -> None:
    """The planner's own refusals (e.g. run.slab_depth not a multiple of the chunk depth)."""
    from emflow.plan import plan_output

    plan_output(recipe, len(catalog.slices), catalog.shape_yx, catalog.dtype)


def _check_alignable(recipe: Recipe, catalog: SliceCatalog) -> None:
    y, x = catalog.shape_yx
    if recipe.align.enabled and min(y, x) < MIN_ALIGN_PX:
        why = "by default" if "align" not in recipe.model_fields_set else "in the recipe"
        raise RecipeError(
            f"field 'align': slices of {x} × {y} px are too small for feature alignment (it "
            f"needs at least {MIN_ALIGN_PX} px per side; alignment is on {why}); set "
            "'align: false'"
        )


# ---- resources -----------------------------------------------------------------------
def _check_cluster(request: Any) -> None:
    """Validate the cluster request (kind, config file, keys, memory sizes); start nothing."""
    if request is None:
        return
    from emflow import cluster as clusters

    if request.memory_per_worker is not None:
        try:
            parse_memory(request.memory_per_worker)
        except ValueError as exc:
            raise ClusterError(f"--memory-per-worker: {exc}") from None
    described = clusters.describe(request)  # checks kind, config file, keys
    kw = described.get("kwargs") or {}
    for key in ("memory", "memory_limit"):
        value = kw.get(key)
        if isinstance(value, str) and value != "auto":
            try:
                parse_memory(value)
            except ValueError as exc:
                raise ClusterError(
                    f"cluster config {described['config']}: '{key}': {exc}"
                ) from None


def _check_memory(recipe: Recipe, catalog: SliceCatalog, out_dtype: str) -> None:
    """One slice must fit in the memory a unit may use (the planner's budget), named by file.

    A damaged header can declare a slice of 300000 × 300000 px; this says which file.
    """
    from emflow.plan import unit_budget

    budget, source = unit_budget(recipe)
    y, x = catalog.shape_yx
    in_b, out_b = (2 if catalog.dtype == "uint16" else 1), (2 if out_dtype == "uint16" else 1)
    need = y * x * (2 * in_b + 2 * out_b)  # decoded, warped, 8-bit/CLAHE and written copies
    if need > budget:
        first = next((s.path for s in catalog.slices if s.path), "the slices")
        raise SourceError(
            f"{first}: slices of {x} × {y} px need about {need / 2**30:.1f} GiB each while "
            f"rendering, more than a unit may use ({budget / 2**30:.1f} GiB: {source}); check "
            "the image size in the file headers, or raise run.memory_per_worker"
        )


def _load_alignment(path: str | Path, catalog: SliceCatalog) -> Any:
    from emflow.align_stage import load_alignment

    try:
        alignment = load_alignment(Path(path), catalog)
    except AlignmentError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise AlignmentError(
            f"{path}: not a valid alignment file ({type(exc).__name__}: {exc}); give the "
            "alignment.json of an earlier run (emflow-run/alignment.json)"
        ) from None
    fy, fx = alignment.frame_shape_yx
    if fy <= 0 or fx <= 0:
        raise AlignmentError(
            f"{path}: frame_shape_yx {[fy, fx]} is not a positive size; give the alignment.json "
            "of an earlier run (emflow-run/alignment.json)"
        )
    return alignment


# ---- the output location -------------------------------------------------------------
def _check_writable(root: Path) -> None:
    """output_dir (or its nearest existing parent) must be a directory we may write into."""
    probe = root
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "it" if probe == root else f"{probe}"
        raise OutputError(
            f"output_dir {root} is not writable: {what} is a file, not a directory; choose "
            "another output_dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"output_dir {root} is not writable ({probe}: permission denied or read-only); "
            "choose a directory you can write to"
        )
    if _read_only_mount(probe):
        raise OutputError(
            f"output_dir {root} is not writable ({probe} is on a read-only file system); "
            "choose a directory you can write to"
        )


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_run_folder(run_dir: Path) -> str | None:
    if not os.path.lexists(run_dir):
        return None
    owner = ownership.owner_of(run_dir)
    if owner is None and not ownership._empty_dir(run_dir):
        raise ownership.refused(run_dir, "is not a run folder emflow made")
    return owner


def _check_outputs(recipe: Recipe, root: Path, owner: str | None) -> None:
    for i, o in enumerate(recipe.outputs):
        for path in (root / o.name, root / (o.name + PARTIAL_SUFFIX)):
            if not os.path.lexists(path):
                continue
            if path.is_symlink() or not path.is_dir():
                raise OutputError(
                    f"{path} already exists and is not a folder emflow wrote; move it away, or "
                    f"choose another outputs.{i}.name"
                )
            if not ownership.is_owned(path, owner):
                raise OutputError(
                    f"{path} already exists and was not written by emflow for this output_dir; "
                    f"emflow replaces only what it wrote: move it away, or choose another "
                    f"outputs.{i}.name"
                )


def _inside(a: str, b: str) -> bool:
    """True if real path ``a`` is ``b`` or lies inside it."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _check_overlap(recipe: Recipe, catalog: SliceCatalog, root: Path) -> None:
    """No path emflow writes (run folder, outputs) may be, or contain, a source file or folder.

    output_dir itself may lie inside the source folder: discovery reads files only, so the
    output folders never join the stack (a rerun finds the same stack).
    """
    src_dirs = {os.path.realpath(os.path.dirname(s.path)) for s in catalog.slices if s.path}
    if recipe.source.directory is not None:
        src_dirs.add(os.path.realpath(recipe.resolve(recipe.source.directory)))
    targets = [(root / RUN_FOLDER, "the run folder")]
    for i, o in enumerate(recipe.outputs):
        targets += [
            (root / o.name, f"outputs.{i}.name"),
            (root / (o.name + PARTIAL_SUFFIX), f"outputs.{i}.name"),
        ]
    names = {path.name for path, _ in targets}
    src_files = {
        os.path.realpath(s.path) for s in catalog.slices if s.path and Path(s.path).name in names
    }
    for path, what in targets:
        real = os.path.realpath(path)
        if real in src_files:
            raise OutputError(
                f"{path} ({what}) is a source slice: emflow never writes over its sources; "
                "choose another output name or output_dir"
            )
        for d in sorted(src_dirs):
            if _inside(d, real):
                raise OutputError(
                    f"{path} ({what}) is the source folder {d} or holds it: emflow never writes "
                    "over its sources; choose another output name or output_dir"
                )


def _check_earlier_run(recipe: Recipe, run_dir: Path, stack: dict[str, Any], restart: bool) -> bool:
    """True when the run folder holds a resumable run of this recipe and stack."""
    if restart:
        return False
    try:
        info = json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    fingerprint = recipe.output_fingerprint()
    if info.get("fingerprint") != fingerprint:
        raise OutputError(
            f"{run_dir} holds a run of a different recipe (fingerprint {info.get('fingerprint')} "
            f"!= {fingerprint}), so it cannot be resumed; use --restart to redo everything, or "
            "choose another output_dir"
        )
    old = read_stack_fingerprint(run_dir)
    if old is not None:
        changes = stack_changes(old, stack)
        if changes:
            raise SourceError(
                f"the source stack changed since {run_dir} was written: {'; '.join(changes)}; "
                "its output would mix old and new slices: run with --restart to redo everything "
                "(or restore the stack)"
            )
    return True


def _space_notes(root: Path, catalog: SliceCatalog, recipe: Recipe) -> list[str]:
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return []
    # uncompressed pyramid (x 8/7) per output; raw-ish outputs dominate, JPEG is far smaller
    need = catalog.nbytes * 8 // 7 * len(recipe.outputs)
    if free < need:
        return [
            f"note: {free / 1e9:.1f} GB free under {probe}; uncompressed, the outputs would take "
            f"about {need / 1e9:.1f} GB (compression usually needs less)"
        ]
    return []
