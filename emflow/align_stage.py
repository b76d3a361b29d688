"""The alignment stages of a run: features per slice, matches per pair, one solve.

Feature and match units write their results to the run folder (features as
``features/z<z>.npz``, pairs in their unit results) so a resumed run does not
recompute them; the solve runs in the driver on small data (as a one-unit lattice
stage, so a resumed run skips it) and writes ``alignment.json`` plus the QC table and
plots.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emflow.discover import SliceCatalog, SliceRef
from emflow.errors import AlignmentError
from emflow.lattice.execute import Unit
from emflow.recipe import Recipe


def features_unit(
    ref: SliceRef,
    shape_yx: tuple[int, int],
    downsample: int | None,
    nfeatures: int,
    out_path: str,
    cache_dir: str | None = None,
    coarse: bool = True,
) -> dict:
    """Decode one slice, judge it, compute SIFT features on its reduced copy, save them.

    With ``cache_dir`` the decoded slice is also kept as zstd-1 for the render pass.
    """
    import cv2

    from emflow.align.features import compute_features, thumbnail
    from emflow.align.quality import assess_slice
    from emflow.io.readers import read_image

    cv2.setNumThreads(1)
    if ref.fill is not None or ref.path is None:
        image = np.zeros(shape_yx, np.uint8)
        bad: str | None = "missing slice (filled)"
    else:
        image = read_image(ref.path, ref.page)
        bad = assess_slice(image)
        if cache_dir is not None:
            from emflow.io.slicecache import store_slice

            store_slice(cache_dir, ref.z, image)
    feats = compute_features(image, downsample=downsample, nfeatures=nfeatures, coarse=coarse)
    thumb, scale = thumbnail(image)
    tmp = out_path + ".tmp.npz"
    coarse = {}
    if feats.coarse is not None:
        coarse = {
            "coarse_keypoints_xy": feats.coarse.keypoints_xy,
            "coarse_descriptors": feats.coarse.descriptors,
            "coarse_downsample": np.array(feats.coarse.downsample),
        }
    np.savez(
        tmp,
        keypoints_xy=feats.keypoints_xy,
        descriptors=feats.descriptors,
        shape_yx=np.array(feats.shape_yx),
        downsample=np.array(feats.downsample),
        thumb=thumb,
        thumb_scale=np.array(scale),
        **coarse,
    )
    Path(tmp).replace(out_path)
    return {"z": ref.z, "keypoints": len(feats.keypoints_xy), "bad": bad}


def slice_cache_dir(run_dir: Path) -> Path:
    """Where decoded slices are kept between the feature and render passes."""
    return run_dir / "slice-cache"


def _load_features(path: str) -> Any:
    from emflow.align.features import Features

    with np.load(path) as d:
        shape_yx = tuple(int(v) for v in d["shape_yx"])
        coarse = None
        if "coarse_keypoints_xy" in d:
            coarse = Features(
                d["coarse_keypoints_xy"],
                d["coarse_descriptors"],
                shape_yx,
                int(d["coarse_downsample"]),
            )
        return Features(
            d["keypoints_xy"],
            d["descriptors"],
            shape_yx,
            int(d["downsample"]),
            coarse,
        )


def match_unit(path_a: str, path_b: str, z_a: int, z_b: int, config: dict) -> dict:
    """Match the saved features of two slices; returns the PairResult as a dict."""
    import cv2

    from emflow.align.match import MatchConfig, match_features

    cv2.setNumThreads(1)
    result = match_features(
        _load_features(path_a),
        _load_features(path_b),
        z_a=z_a,
        z_b=z_b,
        config=MatchConfig(**config),
    )
    return result.to_dict()


def align_stack(
    recipe: Recipe,
    catalog: SliceCatalog,
    run_dir: Path,
    stage: Callable[..., dict[int, Any]],
    say: Callable[[str], None],
) -> Any:
    """Run features → match → solve for a catalog; returns the Alignment (read back from
    the run folder's alignment.json).

    ``stage(name, units, **kw)`` runs a lattice stage (``kw`` passed to
    :func:`~emflow.lattice.execute.run_stage`; the solve runs ``where="driver"``).
    """
    from emflow.align.match import MatchConfig, PairResult

    cfg = recipe.align
    feat_dir = run_dir / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(feat_dir / f"z{ref.z:06d}.npz") for ref in catalog.slices]
    bytes_per_slice = (
        catalog.shape_yx[0] * catalog.shape_yx[1] * (2 if catalog.dtype == "uint16" else 1)
    )
    cache = str(slice_cache_dir(run_dir)) if recipe.run.cache_decoded else None
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
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
            ),
            bytes_per_slice,
        )
        for i, ref in enumerate(catalog.slices)
    ]
    feats = stage("features", units)
    bad = {z: r["bad"] for z, r in feats.items() if r["bad"]}
    if bad:
        say(f"bad slices: {', '.join(f'z{z} ({why})' for z, why in sorted(bad.items()))}")
    config = {
        "model": cfg.model,
        "model_corner_threshold_px": cfg.model_corner_threshold_px,
        "ratio": cfg.ratio,
        "coarse_fallback": cfg.coarse_fallback,
    }
    MatchConfig(**config)  # fail early on a bad field
    n = len(catalog.slices)
    pair_list = [(z, z + k) for z in range(n) for k in (1, 2) if z + k < n]
    units = [
        Unit(i, match_unit, (paths[a], paths[b], a, b, config))
        for i, (a, b) in enumerate(pair_list)
    ]
    pairs = [PairResult.from_dict(d) for _, d in sorted(stage("match", units).items())]
    # the solve runs in the driver, as a lattice stage: done once alignment.json and the QC
    # files are written; every run then reads alignment.json, so a resumed run equals a fresh one
    stage(
        "solve",
        [Unit(0, solve_alignment, (pairs, n, bad, paths, run_dir, recipe, catalog.shape_yx, say))],
        where="driver",
    )
    from emflow.align.solve import Alignment

    return Alignment.from_json(run_dir / "alignment.json")


def solve_alignment(
    pairs: list,
    n: int,
    bad: dict[int, str],
    feature_paths: list[str],
    run_dir: Path,
    recipe: Recipe,
    shape_yx: tuple[int, int],
    say: Callable[[str], None],
) -> dict:
    """Solve transforms and frame from the matched pairs; write alignment.json and QC files."""
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
        )
    except AlignmentError as exc:
        raise AlignmentError(f"{exc}. {_failure_summary(pairs)}") from None
    alignment.to_json(run_dir / "alignment.json")
    failed = [p for p in pairs if not p.ok]
    breaks = getattr(alignment, "segment_breaks", None)
    if breaks:
        say(
            f"alignment split into segments at z {', '.join(f'{a}|{b}' for a, b in breaks)} "
            "(two or more consecutive slices could not be aligned): check them in qc/pairs.png"
        )
    say(
        f"alignment: {cfg.method} solve over {len(pairs)} pairs ({len(failed)} failed, "
        f"{len(alignment.rejected_pairs)} rejected); frame {alignment.frame_shape_yx[1]} × "
        f"{alignment.frame_shape_yx[0]} px → {run_dir / 'alignment.json'}"
    )
    write_qc(alignment, pairs, feature_paths, run_dir, recipe, shape_yx)
    return {
        "alignment": "alignment.json",
        "pairs": len(pairs),
        "failed": len(failed),
        "frame_yx": [int(v) for v in alignment.frame_shape_yx],
    }


def _failure_summary(pairs: list) -> str:
    """One sentence on how the pairs failed, e.g. for a stack in which nothing matched."""
    import re
    from collections import Counter

    failed = [p for p in pairs if not p.ok]
    kinds = Counter(re.sub(r"\(.*?\)", "(…)", p.reason) for p in failed)
    if not kinds:
        return f"All {len(pairs)} pairs matched"
    kind, count = kinds.most_common(1)[0]
    example = next(p for p in failed if re.sub(r"\(.*?\)", "(…)", p.reason) == kind)
    return (
        f"{len(failed)} of {len(pairs)} pairs failed, {count} of them like z{example.z_a}→z{example.z_b}: "
        f"{example.reason}"
    )


def write_qc(
    alignment: Any,
    pairs: list,
    feature_paths: list[str],
    run_dir: Path,
    recipe: Recipe,
    shape_yx: tuple[int, int],
) -> None:
    """Pair table (CSV), residual/inlier plots and before/after XZ/YZ reslices (PNG) in run_dir/qc."""
    import cv2

    from emflow.align import qc

    qc_dir = run_dir / "qc"
    qc_dir.mkdir(exist_ok=True)
    qc.write_pair_table(pairs, alignment, qc_dir / "pairs.csv", shape_yx=shape_yx)
    qc.plot_pairs(pairs, alignment, qc_dir / "pairs.png", shape_yx=shape_yx)
    thumbs, scale = [], 1
    for p in feature_paths:
        with np.load(p) as d:
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
