"""The alignment stages of a run: features per slice, two rounds of pair matching, one solve,
and a QC measurement of every link against the content once the stack is aligned.

Stages: ``features`` (per slice: SIFT keypoints, area copy, thumbnail, usability),
``match`` (neighbours ``(z, z+1)``), ``match2`` (second neighbours from composed estimates,
and bridges over the cuts round 1 left; :mod:`emflow.align.pairs`), the solve in the driver,
then ``qc`` (per matched pair: residual patch displacements after alignment). Feature and match
units write their results to the run folder (features as ``features/z<z>.npz``, pairs in
their unit results) so a resumed run does not recompute them. The solve runs in the driver
as a one-unit lattice stage (a resumed run skips it) and writes ``alignment.json``; every
run then reads that file back, so a resumed run equals a fresh one. ``qc/`` (pair table and
plots) is written even when the run stops because the stack cannot be aligned, so the
reasons can be inspected.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emflow.discover import SliceCatalog, SliceRef
from emflow.errors import AlignmentError
from emflow.io.location import join, put_bytes
from emflow.lattice.execute import Unit

if TYPE_CHECKING:  # annotations only: workers unpickle this module's units without pydantic
    from emflow.recipe import Recipe


def features_unit(
    ref: SliceRef,
    shape_yx: tuple[int, int],
    downsample: int | None,
    nfeatures: int,
    out_path: str,
    cache_dir: str | None = None,
    coarse: bool = True,
    area: bool = True,
) -> dict:
    """Decode one slice, judge it, compute its features (SIFT, area copy), save them.

    With ``cache_dir`` the decoded slice is also kept as zstd-1 for the render pass.
    """
    import cv2

    from emflow.align.features import compute_features, thumbnail, working_block_means
    from emflow.align.frame import footprint_hull
    from emflow.align.quality import assess_slice
    from emflow.align.trend import footprint_pose
    from emflow.io.readers import read_image

    cv2.setNumThreads(1)
    reduced = None
    if ref.fill is not None or ref.path is None:
        image = np.zeros(shape_yx, np.uint8)
        bad: str | None = "missing slice (filled)"
    else:
        image = read_image(ref.path, ref.page)
        if cache_dir is not None:  # first: its buffers reuse the heap before the reductions
            from emflow.io.slicecache import store_slice

            store_slice(cache_dir, ref.z, image)
        reduced = working_block_means(image, downsample)  # shared by QC and the working copy
        bad = assess_slice(image, reduced)
    feats = compute_features(
        image,
        downsample=downsample,
        nfeatures=nfeatures,
        coarse="lazy" if coarse else False,  # SIFT of the coarse copy when a pair needs it
        area=area,
        reduced=reduced,
    )
    thumb, scale = thumbnail(image)
    extra = {}
    if feats.coarse_copy is not None:
        extra = {
            "coarse_work": feats.coarse_copy.work,
            "coarse_valid": feats.coarse_copy.valid,
            "coarse_downsample": np.array(feats.coarse_copy.downsample),
            "coarse_nfeatures": np.array(feats.coarse_copy.nfeatures),
        }
    if feats.area is not None:
        extra["area"] = feats.area
        extra["area_factor"] = np.array(feats.area_factor)
    buf = io.BytesIO()
    np.savez(
        buf,
        keypoints_xy=feats.keypoints_xy,
        descriptors=saved_descriptors(feats.descriptors),
        shape_yx=np.array(feats.shape_yx),
        downsample=np.array(feats.downsample),
        thumb=thumb,
        thumb_scale=np.array(scale),
        **extra,
    )
    put_bytes(out_path, buf.getvalue())  # atomic on disk; one PUT into a bucket's run folder
    foot = footprint_pose(feats.area, feats.area_factor)
    hull = footprint_hull(feats.area, feats.area_factor, feats.shape_yx)
    return {
        "z": ref.z,
        "keypoints": len(feats.keypoints_xy),
        "bad": bad,
        "footprint": None if foot is None else list(foot),
        "hull": None if hull is None else hull.tolist(),
    }


def saved_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """SIFT descriptors as saved: uint8 when every value is a whole number in 0..255 (OpenCV's
    float32 SIFT descriptors are: it rounds each to a byte), so 4000 keypoints' descriptors
    take 0.5 MB instead of 2 MB (the file 1.0 instead of 2.5 MB) and read back as the same
    float32 values; float32 otherwise."""
    d = np.asarray(descriptors)
    if d.dtype == np.float32 and d.size:
        with np.errstate(invalid="ignore"):  # NaN or out of range: told apart below
            small = d.astype(np.uint8)
        if np.array_equal(small, d):  # NaN, fractions and values outside 0..255 differ
            return small
    return d


def _float_descriptors(d: np.ndarray) -> np.ndarray:
    """Descriptors as matching takes them (float32), from either saved form."""
    return d if d.dtype == np.float32 else d.astype(np.float32)


def slice_cache_dir(run_dir: Path) -> str:
    """Where decoded slices are kept between the feature and render passes (in the bucket for a
    bucket output_dir: :func:`emflow.io.runmirror.data_path`)."""
    from emflow.io.runmirror import data_path

    return data_path(run_dir, "slice-cache")


#: What a pair unit reads of a slice's saved features (those present in the file)
_SIFT_NAMES = (
    "shape_yx", "downsample", "keypoints_xy", "descriptors", "coarse_keypoints_xy",
    "coarse_descriptors", "coarse_downsample", "coarse_work", "coarse_valid",
    "coarse_nfeatures", "area", "area_factor",
)  # fmt: skip
_AREA_NAMES = ("shape_yx", "downsample", "area", "area_factor")


def _load_features(path: str, sift: bool = True) -> Any:
    """Saved features; their coarse set as saved: computed (a run folder of an earlier
    version) or as its working copy (SIFT when a pair needs it: ``Features.coarse_set``).
    ``sift`` False: without keypoints, descriptors and coarse set (none of them read) when
    the file has an area copy -- what a match from a given estimate uses. Arrays are
    read-only, shared through the worker's cache (:mod:`emflow.align.saved`)."""
    from emflow.align.features import CoarseCopy, Features
    from emflow.align.saved import read_arrays

    def wanted(names: frozenset[str]) -> tuple[str, ...]:
        return _AREA_NAMES if not sift and "area" in names else _SIFT_NAMES

    d = read_arrays(path, wanted)
    shape_yx = tuple(int(v) for v in d["shape_yx"])
    factor = int(d["area_factor"]) if "area_factor" in d else 1
    if not sift and "area" in d:
        empty = np.zeros((0, 2), np.float32)
        return Features(
            empty,
            np.zeros((0, 128), np.float32),
            shape_yx,
            int(d["downsample"]),
            area=d["area"],
            area_factor=factor,
        )
    coarse = coarse_copy = None
    if "coarse_keypoints_xy" in d:
        coarse = Features(
            d["coarse_keypoints_xy"],
            _float_descriptors(d["coarse_descriptors"]),
            shape_yx,
            int(d["coarse_downsample"]),
        )
    elif "coarse_work" in d:
        coarse_copy = CoarseCopy(
            d["coarse_work"],
            d["coarse_valid"],
            int(d["coarse_downsample"]),
            int(d["coarse_nfeatures"]),
            shape_yx,
        )
    return Features(
        d["keypoints_xy"],
        _float_descriptors(d["descriptors"]),
        shape_yx,
        int(d["downsample"]),
        coarse,
        d.get("area"),
        factor,
        coarse_copy,
    )


def _load_area(path: str) -> tuple[np.ndarray | None, int]:
    """Only the area copy and its factor of saved features (what the QC needs: not the
    keypoints and descriptors)."""
    from emflow.align.saved import read_arrays

    d = read_arrays(path, lambda names: ("area", "area_factor"))
    if "area" not in d:
        return None, 1
    return d["area"], int(d["area_factor"]) if "area_factor" in d else 1


def match_unit(
    path_a: str,
    path_b: str,
    z_a: int,
    z_b: int,
    config: dict,
    initial: list[list[float]] | None = None,
    initial_close: bool = False,
) -> dict:
    """Match the saved features of two slices (from ``initial``, a 2x3 b -> a estimate, if
    given; ``initial_close``: see :func:`~emflow.align.match.match_features`); returns the
    PairResult as a dict."""
    import cv2

    from emflow.align.match import MatchConfig, area_applies, match_features

    cv2.setNumThreads(1)
    # from a given estimate, pairs whose slices both have area copies (of one shape and
    # factor) are matched by area alone (match_features): no SIFT data needed (2 x 2 MB)
    area = bool(config.get("area", True))
    sift = initial is None or not area
    fa, fb = _load_features(path_a, sift), _load_features(path_b, sift)
    if not sift and not area_applies(fa, fb, area):
        fa, fb = _load_features(path_a), _load_features(path_b)
    result = match_features(
        fa,
        fb,
        z_a=z_a,
        z_b=z_b,
        config=MatchConfig(**config),
        initial=None if initial is None else np.asarray(initial, np.float64),
        initial_close=initial_close,
    )
    return result.to_dict()


def _known(result: dict) -> dict:
    """A pair unit whose result is known without matching (a slice of it is unusable)."""
    return result


def content_unit(path_a: str, path_b: str, matrix: list[list[float]]) -> dict:
    """QC of one link after alignment: patch displacements left between the two slices when
    b is mapped into a by ``matrix`` (2x3, from the solved transforms); full-res px."""
    import cv2

    from emflow.align.area import patch_residuals

    cv2.setNumThreads(1)
    (area_a, factor), (area_b, _) = _load_area(path_a), _load_area(path_b)
    if area_a is None or area_b is None or area_a.shape != area_b.shape:
        return {"patches": 0, "median_px": None, "shift_px": None}
    r = patch_residuals(area_a, area_b, factor, np.asarray(matrix, np.float64))
    if not len(r):
        return {"patches": 0, "median_px": None, "shift_px": None}
    return {
        "patches": len(r),
        "median_px": float(np.median(np.linalg.norm(r, axis=1))),
        "shift_px": float(np.linalg.norm(np.median(r, axis=0))),
    }


def align_stack(
    recipe: Recipe,
    catalog: SliceCatalog,
    run_dir: Path,
    stage: Callable[..., dict[int, Any]],
    say: Callable[[str], None],
    pending: list[Future] | None = None,
) -> Any:
    """Run features → match → match2 → solve → qc for a catalog; returns the Alignment (read
    back from the run folder's alignment.json). Raises AlignmentError (after writing ``qc/``)
    when more than half of the neighbour pairs fail or the stack splits where no checked link
    crosses.

    ``stage(name, units, **kw)`` runs a lattice stage (``kw`` passed to
    :func:`~emflow.lattice.execute.run_stage`; the solve runs ``where="driver"``).
    ``pending``: the ``qc/`` files of an aligned stack (reslices, pair table and plot: ~0.3-1
    CPU-s of drawing in the driver) are written in a driver thread that goes on after this
    returns, while the workers render, and its futures are appended there for the caller to
    wait on (:func:`wait_written`); None: they are written before this returns.
    """
    from emflow.align.match import MatchConfig, PairResult
    from emflow.align.pairs import (
        bridge_pairs,
        check_neighbours,
        close_estimate,
        neighbour_pairs,
        skipped,
        summary_lines,
    )
    from emflow.align.solve import Alignment

    cfg = recipe.align
    from emflow.io.runmirror import data_path

    feat_dir = data_path(run_dir, "features")  # in the bucket for a bucket output_dir
    paths = [join(feat_dir, f"z{ref.z:06d}.npz") for ref in catalog.slices]
    bytes_per_slice = (
        catalog.shape_yx[0] * catalog.shape_yx[1] * (2 if catalog.dtype == "uint16" else 1)
    )
    cache = slice_cache_dir(run_dir) if recipe.run.cache_decoded else None
    units = [
        Unit(
            ref.z,
            features_unit,
            (
                ref,
                catalog.shape_yx,
                cfg.downsample,
                cfg.nfeatures,
                paths[i],
                cache,
                cfg.coarse_fallback,
                cfg.area,
            ),
            bytes_per_slice,
        )
        for i, ref in enumerate(catalog.slices)
    ]
    feats = stage("features", units)
    bad = {z: r["bad"] for z, r in feats.items() if r["bad"]}
    footprints = {z: r.get("footprint") for z, r in feats.items()}
    hulls = {z: r.get("hull") for z, r in feats.items()}  # None in results of older runs
    if bad:
        say(f"unusable slices: {', '.join(f'z{z} ({why})' for z, why in sorted(bad.items()))}")
    config = {
        "model": cfg.model,
        "model_corner_threshold_px": cfg.model_corner_threshold_px,
        "ratio": cfg.ratio,
        "coarse_fallback": cfg.coarse_fallback,
        "area": cfg.area,
    }
    MatchConfig(**config)  # fail early on a bad field
    zs = list(range(len(catalog.slices)))

    def match_round(
        name: str,
        plan: list,
        before: dict[tuple[int, int], PairResult],
        on_result: Callable[[Unit, Any], None] | None = None,
    ) -> dict[tuple[int, int], PairResult]:
        round_units = []
        for i, (a, b, m) in enumerate(plan):
            if (s := skipped(a, b, bad)) is not None:  # not matched: its result is known
                round_units.append(Unit(i, _known, (s.to_dict(),)))
                continue
            initial = None if m is None else np.asarray(m).tolist()
            close = m is not None and close_estimate(before, a, b)
            round_units.append(
                Unit(i, match_unit, (paths[a], paths[b], a, b, config, initial, close))
            )
        done: dict[tuple[int, int], PairResult] = {}
        for d in stage(name, round_units, on_result=on_result).values():
            p = PairResult.from_dict(d)
            done[(p.z_a, p.z_b)] = p
        return done

    # the solve runs in the driver while every worker waits: SciPy's import, most of its
    # ~0.5 CPU-s, is done in a driver thread while the workers match -- from the first
    # result on: started before, it holds the GIL while the driver hands out the units
    # (the first match unit started ~0.1 s later)
    solver = _Later(_import_solver, "emflow-import-solver")
    try:
        first = match_round(
            "match", [(a, b, None) for a, b in neighbour_pairs(zs)], {}, solver.start
        )
        second = match_round("match2", bridge_pairs(zs, first, bad), first, solver.start)
        solver.start()  # no unit ran (a stack of one slice)
    finally:
        solver.join()
    pairs = [p for _, p in sorted({**first, **second}.items())]
    failed, stop = check_neighbours(pairs, say)
    if stop:
        write_qc(None, pairs, paths, run_dir, recipe, catalog.shape_yx)
        n_first = sum(1 for p in pairs if p.distance == 1)
        what = (
            f"no slice could be aligned ({len(bad)} of {len(zs)} slices are unusable)"
            if len(zs) - len(bad) < 2
            else f"no usable alignment: {len(failed)} of {n_first} neighbour pairs failed"
        )
        raise AlignmentError(
            f"{what}; {_failure_summary(pairs)}. Check the input and "
            f"{run_dir / 'qc' / 'pairs.csv'}; if the slices are already aligned set "
            "'align: false' in the recipe"
        )
    # the solve runs in the driver, as a lattice stage: done once alignment.json is written;
    # every run then reads alignment.json, so a resumed run equals a fresh one
    stage(
        "solve",
        [
            Unit(
                0,
                solve_alignment,
                (pairs, len(zs), bad, paths, run_dir, recipe, catalog.shape_yx, footprints, hulls),
            )
        ],
        where="driver",
    )
    alignment = Alignment.from_json(run_dir / "alignment.json")
    for line in summary_lines(alignment, len(zs)):
        say(line)
    say(
        f"alignment: {cfg.method} solve (align.regularisation {cfg.regularisation:g}, "
        f"align.detrend {alignment.detrend}); frame "
        f"{alignment.frame_shape_yx[1]} × {alignment.frame_shape_yx[0]} px "
        f"(align.frame {alignment.frame}) → {run_dir / 'alignment.json'}"
    )
    if alignment.cropped:
        say(crop_line(alignment.cropped))
    # the reslices need the solved transforms only: the driver draws them (matplotlib's import
    # and first figure included, ~1 CPU-s) while the workers measure the links, instead of
    # after them with the workers idle -- from the first link measured on, so that the
    # import does not hold the GIL while the driver hands out the units; the pair table and
    # plot follow in the same thread while the workers render (``pending``)
    pool = ThreadPoolExecutor(1, thread_name_prefix="emflow-qc-files")
    futures: list[Future] = []

    def draw(*_: Any) -> None:
        if not futures:
            futures.append(pool.submit(write_reslices, alignment, paths, run_dir, recipe))

    try:
        content = measure_links(alignment, pairs, paths, stage, on_result=draw)
        draw()
    except BaseException:
        draw()
        pool.shutdown(wait=True)  # the reslices are drawn before the error goes on
        raise
    drawn = futures[0]
    written = pool.submit(
        write_qc, alignment, pairs, paths, run_dir, recipe, catalog.shape_yx, content,
        reslices=False,
    )  # fmt: skip
    pool.shutdown(wait=False)  # its thread ends once both files are written
    if pending is None:
        wait_written([drawn, written])
    else:
        pending.extend([drawn, written])
    used = [v for v in content.values() if v["median_px"] is not None]
    if used:
        say(
            "links after alignment (patch NCC residual, full-res px): median "
            f"{np.median([v['median_px'] for v in used]):.2f} local, "
            f"{np.median([v['shift_px'] for v in used]):.2f} global over {len(used)} pairs"
        )
    return alignment


class _Later:
    """A driver thread running ``target`` once :meth:`start` is first called (e.g. as a
    stage's ``on_result``: once its units run); :meth:`join` waits for it if started."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.thread = threading.Thread(target=target, name=name)
        self.started = False

    def start(self, *_: Any) -> None:
        if not self.started:
            self.started = True
            self.thread.start()

    def join(self) -> None:
        if self.started:
            self.thread.join()


def _import_solver() -> None:
    """Import what :func:`emflow.align.solve.solve` imports on first use (SciPy's sparse LU,
    ~0.4 CPU-s); an error is left for the solve to raise."""
    try:
        import scipy.sparse.linalg  # noqa: F401
    except Exception:  # noqa: BLE001 -- the solve imports it again and reports the error
        pass


def wait_written(pending: list[Future], *, quiet: bool = False) -> None:
    """Wait for the ``qc/`` files :func:`align_stack` left to a driver thread; raise the first
    error (``quiet``: none, e.g. while another error is on its way)."""
    for fut in pending:
        if quiet:
            wait([fut])
        else:
            fut.result()
    pending.clear()


def crop_line(cropped: dict[int, float]) -> str:
    """The console line for what the slice-size frame cuts off (``Alignment.cropped``): a
    warning when a slice loses more than ``frame.CROP_WARN`` of its content."""
    from emflow.align.frame import CROP_WARN

    z_max = max(cropped, key=lambda z: cropped[z])
    over = [z for z in sorted(cropped) if cropped[z] > CROP_WARN]
    head = "warning: " if over else "alignment: "
    listing = ", ".join(f"z{z}" for z in over[:10]) + (" …" if len(over) > 10 else "")
    many = f" ({len(over)} over {100 * CROP_WARN:.0f} %: {listing})" if over else ""
    edges = f"{len(cropped)} slices' edges" if len(cropped) > 1 else "1 slice's edges"
    return (
        f"{head}the frame crops {edges}, at most "
        f"{100 * cropped[z_max]:.1f} % of z{z_max}{many}; set align.frame: union to keep every "
        "pixel (the frame then grows with the stack's content)"
    )


def solve_alignment(
    pairs: list,
    n: int,
    bad: dict[int, str],
    feature_paths: list[str],
    run_dir: Path,
    recipe: Recipe,
    shape_yx: tuple[int, int],
    footprints: dict[int, list[float] | None] | None = None,
    hulls: dict[int, list[list[float]] | None] | None = None,
) -> dict:
    """Solve transforms and frame from the matched pairs and write alignment.json (the
    ``solve`` unit); on failure write ``qc/`` for the pairs, then raise AlignmentError.
    ``footprints``: z -> footprint pose from the features units (trend removal, frame);
    ``hulls``: z -> footprint hull (what the frame covers and crops)."""
    from emflow.align.solve import solve

    cfg = recipe.align
    try:
        alignment = solve(
            pairs,
            list(range(n)),
            shape_yx,
            method=cfg.method,
            bad_slices=bad,
            bad_slice_policy=cfg.bad_slices,
            regularisation=cfg.regularisation,
            allow_segments=cfg.allow_segments,
            detrend=cfg.detrend,
            frame=cfg.frame,
            hulls={int(z): h for z, h in hulls.items()} if hulls else None,
            footprints={int(z): None if f is None else tuple(f) for z, f in footprints.items()}
            if footprints
            else None,
        )
    except AlignmentError as exc:
        write_qc(None, pairs, feature_paths, run_dir, recipe, shape_yx)
        raise AlignmentError(f"{exc}. {_failure_summary(pairs)}") from None
    alignment.to_json(run_dir / "alignment.json")
    return {
        "alignment": "alignment.json",
        "pairs": len(pairs),
        "failed": sum(1 for p in pairs if not p.ok),
        "frame_yx": [int(v) for v in alignment.frame_shape_yx],
    }


def measure_links(
    alignment: Any,
    pairs: list,
    paths: list[str],
    stage: Callable[..., dict[int, Any]],
    on_result: Callable[[Unit, Any], None] | None = None,
) -> dict[tuple[int, int], dict]:
    """The ``qc`` stage: every successful pair measured against the content after alignment
    (``on_result`` called with each unit's result as it comes)."""
    todo = [p for p in pairs if p.ok]
    units = []
    for i, p in enumerate(todo):
        ta = np.vstack([alignment.transforms[p.z_a], [0.0, 0.0, 1.0]])
        tb = np.vstack([alignment.transforms[p.z_b], [0.0, 0.0, 1.0]])
        m = (np.linalg.inv(ta) @ tb)[:2]
        units.append(Unit(i, content_unit, (paths[p.z_a], paths[p.z_b], m.tolist())))
    res = stage("qc", units, on_result=on_result)
    return {(todo[i].z_a, todo[i].z_b): v for i, v in res.items()}


def _failure_summary(pairs: list) -> str:
    """One sentence on how the pairs failed, e.g. for a stack in which nothing matched."""
    import re
    from collections import Counter

    failed = [p for p in pairs if not p.ok]

    def kind_of(reason: str) -> str:
        return re.sub(r"\d+", "#", re.sub(r"\(.*?\)", "(…)", reason))

    kinds = Counter(kind_of(p.reason) for p in failed)
    if not kinds:
        return f"all {len(pairs)} pairs matched"
    kind, count = kinds.most_common(1)[0]
    example = next(p for p in failed if kind_of(p.reason) == kind)
    return (
        f"{len(failed)} of {len(pairs)} pairs failed, {count} of them like "
        f"z{example.z_a}→z{example.z_b}: {example.reason}"
    )


def write_qc(
    alignment: Any,
    pairs: list,
    feature_paths: list[str],
    run_dir: Path,
    recipe: Recipe,
    shape_yx: tuple[int, int],
    content: dict[tuple[int, int], dict] | None = None,
    reslices: bool = True,
) -> None:
    """Pair table (CSV), residual/inlier plots and before/after XZ/YZ reslices (PNG) in
    run_dir/qc. ``alignment`` None (the run stops before a solve): pairs only; the reslices
    need the features' thumbnails (a rerun after they were tidied away keeps the old PNG).
    ``reslices`` False: not the reslices (:func:`write_reslices`, which :func:`align_stack`
    runs beside the qc stage)."""
    from emflow.align import qc

    qc_dir = run_dir / "qc"
    qc_dir.mkdir(exist_ok=True)
    qc.write_pair_table(pairs, alignment, qc_dir / "pairs.csv", shape_yx=shape_yx, content=content)
    qc.plot_pairs(pairs, alignment, qc_dir / "pairs.png", shape_yx=shape_yx, content=content)
    if alignment is not None and reslices:
        write_reslices(alignment, feature_paths, run_dir, recipe)


def write_reslices(alignment: Any, feature_paths: list[str], run_dir: Path, recipe: Recipe) -> None:
    """run_dir/qc/reslices.png: XZ/YZ reslices of the features' thumbnails before and after
    ``alignment``; nothing when the features were tidied away (a complete run's rerun keeps
    the old PNG)."""
    import cv2

    from emflow.align import qc
    from emflow.align.saved import read_arrays

    thumbs, scale = [], 1
    for p in feature_paths:
        try:  # the thumbnail alone (not the whole file); not kept: the driver's read
            d = read_arrays(p, lambda names: ("thumb", "thumb_scale"), keep=False)
        except FileNotFoundError:  # a complete run's rerun (features tidied away): keep the PNG
            return
        thumbs.append(d["thumb"])
        scale = int(d["thumb_scale"])
    before = np.stack(thumbs)
    fy = -(-alignment.frame_shape_yx[0] // scale)
    fx = -(-alignment.frame_shape_yx[1] // scale)
    after = np.zeros((len(thumbs), fy, fx), before.dtype)
    s = np.diag([scale, scale, 1.0])
    s_inv = np.diag([1.0 / scale, 1.0 / scale, 1.0])
    for z, thumb in enumerate(thumbs):
        m = alignment.transforms.get(z)
        if m is None:
            continue
        full = np.vstack([np.asarray(m, np.float64), [0, 0, 1]])
        small = (s_inv @ full @ s)[:2]
        after[z] = cv2.warpAffine(thumb, small, (fx, fy), flags=cv2.INTER_LINEAR, borderValue=0)
    vs = recipe.voxel_size_nm
    qc_dir = run_dir / "qc"
    qc_dir.mkdir(exist_ok=True)
    qc.plot_reslices(before, after, qc_dir / "reslices.png", (vs[0] * scale, vs[1] * scale, vs[2]))


def load_alignment(path: Path, catalog: SliceCatalog) -> Any:
    """Read an alignment.json for re-export and check it covers this stack."""
    from emflow.align.solve import Alignment

    alignment = Alignment.from_json(path)
    missing = [ref.z for ref in catalog.slices if ref.z not in alignment.transforms]
    if missing:
        raise AlignmentError(
            f"{path} has no transform for z {missing[0]} (and {len(missing) - 1} more): it was made for "
            "another stack; re-run without --alignment"
        )
    return alignment
