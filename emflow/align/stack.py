"""Align a stack held in memory: features -> two rounds of pair matching -> global solve.

The same steps, planning and checks as a pipeline run (``emflow.align_stage``), without Dask
or a run folder: for notebooks, tests and benchmarks. ``map_`` lets a caller spread the
per-slice and per-pair work over processes (e.g. ``ProcessPoolExecutor().map``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from emflow.align.features import Features, compute_features, working_block_means
from emflow.align.frame import footprint_hull
from emflow.align.match import MatchConfig, PairResult, match_features
from emflow.align.pairs import bridge_pairs, close_estimate, neighbour_pairs, skipped
from emflow.align.quality import assess_slice
from emflow.align.solve import Alignment, solve
from emflow.align.trend import footprint_pose

__all__ = ["align_features", "align_slices", "match_pairs", "slice_features"]

Mapper = Callable[..., Iterable[Any]]


def _features_of(image: np.ndarray, downsample: int | None, nfeatures: int) -> tuple:
    import cv2

    cv2.setNumThreads(1)
    reduced = working_block_means(image, downsample)  # shared by QC and the working copy
    feats = compute_features(image, downsample=downsample, nfeatures=nfeatures, reduced=reduced)
    return feats, assess_slice(image, reduced)


def slice_features(
    slices: Sequence[np.ndarray],
    *,
    downsample: int | None = None,
    nfeatures: int = 4000,
    map_: Mapper = map,
) -> tuple[list[Features], dict[int, str]]:
    """Features of every (y, x) slice and the slices judged unusable (index -> reason)."""
    out = list(map_(partial(_features_of, downsample=downsample, nfeatures=nfeatures), slices))
    return [f for f, _ in out], {z: bad for z, (_, bad) in enumerate(out) if bad}


def _match_one(job: tuple, config: MatchConfig) -> PairResult:
    import cv2

    cv2.setNumThreads(1)
    fa, fb, z_a, z_b, initial, close = job
    return match_features(
        fa, fb, z_a=z_a, z_b=z_b, config=config, initial=initial, initial_close=close
    )


def match_pairs(
    features: Sequence[Features],
    bad: Mapping[int, str],
    *,
    config: MatchConfig | None = None,
    map_: Mapper = map,
) -> list[PairResult]:
    """Round 1 (neighbours) and round 2 (second neighbours, bridges) of :mod:`emflow.align.pairs`."""
    config = config or MatchConfig()
    zs = range(len(features))

    def run(
        plan: list[tuple[int, int, np.ndarray | None]],
        before: Mapping[tuple[int, int], PairResult],
    ) -> dict[tuple[int, int], PairResult]:
        done = {(a, b): s for a, b, _ in plan if (s := skipped(a, b, bad)) is not None}
        todo = [
            (features[a], features[b], a, b, m, m is not None and close_estimate(before, a, b))
            for a, b, m in plan
            if (a, b) not in done
        ]
        for p in map_(partial(_match_one, config=config), todo):
            done[(p.z_a, p.z_b)] = p
        return done

    first = run([(a, b, None) for a, b in neighbour_pairs(zs)], {})
    second = run(bridge_pairs(zs, first, bad), first)
    return [p for _, p in sorted({**first, **second}.items())]


def align_features(
    features: Sequence[Features],
    bad: Mapping[int, str] | None = None,
    *,
    config: MatchConfig | None = None,
    map_: Mapper = map,
    **solve_kw: Any,
) -> Alignment:
    """Match and solve a stack from its slices' features (``solve_kw`` go to :func:`solve`)."""
    bad = dict(bad or {})
    pairs = match_pairs(features, bad, config=config, map_=map_)
    feet = {z: footprint_pose(f.area, f.area_factor) for z, f in enumerate(features)}
    hulls = {z: footprint_hull(f.area, f.area_factor, f.shape_yx) for z, f in enumerate(features)}
    return solve(
        pairs,
        range(len(features)),
        features[0].shape_yx,
        bad_slices=bad,
        footprints=feet,
        hulls=hulls,
        **solve_kw,
    )


def align_slices(
    slices: Sequence[np.ndarray],
    *,
    downsample: int | None = None,
    nfeatures: int = 4000,
    config: MatchConfig | None = None,
    map_: Mapper = map,
    **solve_kw: Any,
) -> Alignment:
    """Align a stack of (y, x) slices held in memory; see the module docstring.

    Examples
    --------
    >>> from emflow.testing import synthetic_stack
    >>> from emflow.align.stack import align_slices
    >>> al = align_slices(synthetic_stack((4, 256, 256), seed=1))
    >>> sorted(al.transforms), al.pair_summary()["neighbour"]["matched"]
    ([0, 1, 2, 3], 3)
    """
    feats, bad = slice_features(slices, downsample=downsample, nfeatures=nfeatures, map_=map_)
    return align_features(feats, bad, config=config, map_=map_, **solve_kw)
