"""Match the features of two slices and fit their relative 2x3 transform with RANSAC.

Core representation: :class:`PairResult` for slices ``(z_a, z_b)`` carries a 2x3 float64
matrix in FULL-resolution ``(x, y)`` pixel coordinates that maps a point of slice ``z_b``
onto the same tissue in slice ``z_a`` (``p_a = M @ [x_b, y_b, 1]``). So, with
``T_z`` the source->global transform of slice z, ``T_b = T_a @ M`` (3x3 homogeneous).

Model choice ("auto"): fit the affine on the RANSAC inliers, fit translation and rigid
on the same inliers, and keep the simplest model whose largest displacement from the
affine over the four corners of slice ``z_b`` is below ``model_corner_threshold_px``
(full-resolution px). The decision is made in pixels, never on a matrix coefficient.
A pair that fails a check is a failure (``ok=False`` with a reason), never "identity".

Coarse fallback: a pair that fails at the working scale is matched again on both slices'
coarse feature sets (``Features.coarse``, 4x coarser) with the looser ratio
``coarse_ratio``. Serial-section TEM neighbours share large structures but few fine ones:
on the real VNC stack (1024², 45 nm sections) the working scale finds 3-9 inliers per
neighbour pair and the coarse set 30-100.

Area-based refinement (``MatchConfig.area``, on by default): when both slices carry an area
copy, the pair is always fitted by :func:`emflow.align.area.match_area` (patch NCC in both
directions, robust affine whose tolerance follows the measured displacement scatter),
starting from SIFT's estimate when SIFT found consensus, else from the area matcher's own
coarse rotation search. On real ssTEM neighbours SIFT's 3-9 (working scale) or 30-100
(coarse) inliers sit on content that moves 3-7 px between sections; several hundred patches
fitted robustly give a far more reproducible and unbiased transform (notes/ALIGNMENT.md §4).
Only if the area fit fails does a SIFT result stand alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from emflow.align.affine import apply_affine
from emflow.align.area import AreaConfig, AreaFit, match_area
from emflow.align.features import Features, compute_features
from emflow.errors import AlignmentError

__all__ = [
    "MODELS",
    "MatchConfig",
    "PairResult",
    "corner_points_xy",
    "failed_pair",
    "fit_affine",
    "fit_rigid",
    "fit_translation",
    "judge_fit",
    "linear_distortion",
    "match",
    "match_features",
    "sift_trusted",
]

MODELS = ("translation", "rigid", "affine")
#: Keypoint count above which FLANN (KD-trees) replaces brute-force kNN.
FLANN_MIN_KEYPOINTS = 3000

#: Final refit keeps inliers within max(REFIT_FLOOR_PX working px, REFIT_MEDIANS x median).
REFIT_FLOOR_PX = 1.0
REFIT_MEDIANS = 3.0
#: A SIFT fit whose inliers lie within this RMS (working px) of it, with at least
#: SIFT_TRUST_INLIERS of them, stands without area refinement: the two slices share their
#: fine detail (FIB-SEM, synthetic stacks: 140-2000 inliers at 0.3-1.1 working px), where
#: SIFT is the more accurate estimator. Real ssTEM neighbours never get there (VNC: 50-90
#: inliers at 1.3-1.6 working px on the 4x coarser set; ISBI: no consensus at all).
SIFT_TRUST_PX = 1.2
SIFT_TRUST_INLIERS = 100

Matrix2x3 = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class MatchConfig:
    """Settings of pairwise matching; px are at the WORKING scale unless named full-res."""

    ratio: float = 0.75  # Lowe ratio test on the 2 nearest descriptors
    ransac_threshold_px: float = 3.0  # RANSAC inlier distance, working px
    min_inliers: int = 20  # fewer inliers -> failed pair
    min_inlier_ratio: float = 0.05  # inliers / ratio-test matches
    max_residual_px: float = 2.0  # inlier RMS of the chosen model, working px
    # real ssTEM neighbours differ by up to ~5 % scale and ~7 % anisotropy (ISBI 19/20), on
    # top of any misplacement: these are plausibility limits, not accuracy limits
    max_scale_deviation: float = 0.1  # |sqrt(det L) - 1| of the affine's linear part L
    max_shear: float = 0.1  # anisotropy (s1 - s2) / (s1 + s2) of L's stretch
    max_translation_fraction: float = 0.5  # centre shift / long side of the slice
    model: str = "auto"  # "auto" | "translation" | "rigid" | "affine"
    model_corner_threshold_px: float = 1.0  # full-res px, see module docstring
    seed: int = 0  # cv2.setRNGSeed before FLANN and RANSAC
    coarse_fallback: bool = True  # retry a failed pair on the coarse feature sets
    coarse_ratio: float = 0.9  # ratio test of that retry (used if looser than ``ratio``)
    area: bool = True  # fit (or refine) every pair by area-based matching (module docstring)

    def __post_init__(self) -> None:
        if self.model not in (*MODELS, "auto"):
            raise AlignmentError(
                f"align.model must be auto, translation, rigid or affine, not {self.model!r}"
            )
        for name in ("ratio", "coarse_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise AlignmentError(f"align.{name} must be in (0, 1], not {getattr(self, name)!r}")
        for name in ("ransac_threshold_px", "max_residual_px", "model_corner_threshold_px"):
            if not getattr(self, name) > 0:
                raise AlignmentError(f"align.{name} must be > 0, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class PairResult:
    """Outcome of matching slice ``z_b`` onto slice ``z_a``; matrix maps b's (x, y) into a's.

    Attributes
    ----------
    z_a, z_b : int
        The pair.
    ok : bool
        False if any acceptance check failed; ``reason`` then says which.
    reason : str
        Empty when ok, else e.g. ``"too few inliers (3 < 20)"``.
    model : str
        Chosen model, ``"translation"``, ``"rigid"`` or ``"affine"``.
    matrix : tuple
        Chosen model as a 2x3 nested tuple, full-resolution (x, y) px, b -> a.
    affine : tuple
        The affine fit (same convention), kept for QC.
    inliers, matches : int
        Matches used in the final affine fit (RANSAC inliers within
        ``max(1 working px, 3 x median residual)`` of the refit) and ratio-test matches.
    residual_px : float
        Inlier RMS of the chosen model, full-resolution px.
    corner_gap_px : float
        Largest corner displacement between the chosen model and the affine fit, full-res px.
    downsample : int
        Reduction factor of the features the fit came from (the coarse fallback's is larger;
        for area fits the area copy's factor).
    method : str
        ``"sift"``, ``"area"`` (area matcher from its own coarse search) or ``"sift+area"``
        (area matcher refining SIFT's estimate), ``"area+"`` (refining an estimate given by
        the caller, e.g. composed from neighbouring links).
    support : tuple of float or None
        Where the fit's matches lie in slice ``z_b``: ``(weight, mean_x, mean_y, cov_xx,
        cov_xy, cov_yy)`` (full-res px; weight = number of inlier matches, Tukey-weighted for
        area fits). The global solve weighs the link by it; None = the 4 slice corners.
    scatter_px : float or None
        Robust sigma (per axis, full-res px) of the match displacements about the fit: how
        much the sections' content differs beyond an affine map (area fits).
    fwd_bwd_px : float or None
        Largest corner gap between the forward and backward area fits (full-res px).
    ncc : float or None
        Median peak NCC of the area fit's inlier patches (None: not an area fit).
    """

    z_a: int
    z_b: int
    ok: bool
    reason: str
    model: str
    matrix: Matrix2x3
    affine: Matrix2x3
    inliers: int
    matches: int
    residual_px: float
    corner_gap_px: float
    downsample: int = 1
    method: str = "sift"
    support: tuple[float, ...] | None = None
    scatter_px: float | None = None
    fwd_bwd_px: float | None = None
    ncc: float | None = None

    @property
    def distance(self) -> int:
        """How many sections apart the two slices are (``z_b - z_a``)."""
        return int(self.z_b) - int(self.z_a)

    @property
    def matrix_array(self) -> np.ndarray:
        """The chosen 2x3 matrix as a float64 array (b -> a, full-res (x, y) px)."""
        return np.array(self.matrix, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats kept exact; json writes them with repr)."""
        d = asdict(self)
        d["matrix"] = [list(r) for r in self.matrix]
        d["affine"] = [list(r) for r in self.affine]
        for k in ("residual_px", "corner_gap_px", "scatter_px", "fwd_bwd_px", "ncc"):
            if d[k] is not None and math.isnan(d[k]):  # NaN (failed pair) -> null: strict JSON
                d[k] = None
        if d["support"] is not None:
            d["support"] = list(d["support"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            z_a=int(d["z_a"]),
            z_b=int(d["z_b"]),
            ok=bool(d["ok"]),
            reason=str(d["reason"]),
            model=str(d["model"]),
            matrix=_as_tuple(d["matrix"]),
            affine=_as_tuple(d["affine"]),
            inliers=int(d["inliers"]),
            matches=int(d["matches"]),
            residual_px=_float_or_nan(d["residual_px"]),
            corner_gap_px=_float_or_nan(d["corner_gap_px"]),
            downsample=int(d.get("downsample", 1)),
            method=str(d.get("method", "sift")),
            support=None if d.get("support") is None else tuple(float(v) for v in d["support"]),
            scatter_px=_float_or_none(d.get("scatter_px")),
            fwd_bwd_px=_float_or_none(d.get("fwd_bwd_px")),
            ncc=_float_or_none(d.get("ncc")),
        )


def _float_or_nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _float_or_none(v: Any) -> float | None:
    return None if v is None or math.isnan(float(v)) else float(v)


def _as_tuple(m: Any) -> Matrix2x3:
    a = np.asarray(m, dtype=np.float64).reshape(2, 3)
    return (
        (float(a[0, 0]), float(a[0, 1]), float(a[0, 2])),
        (float(a[1, 0]), float(a[1, 1]), float(a[1, 2])),
    )


_IDENTITY: Matrix2x3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def corner_points_xy(shape_yx: tuple[int, int]) -> np.ndarray:
    """The 4 corner pixel centres of a (y, x) slice as a (4, 2) float64 array of (x, y)."""
    h, w = shape_yx
    return np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)


def fit_affine(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine mapping (N, 2) src points onto dst points, (x, y) px."""
    src = np.asarray(src_xy, np.float64)
    dst = np.asarray(dst_xy, np.float64)
    c_s, c_d = src.mean(axis=0), dst.mean(axis=0)
    a = src - c_s
    sol, *_ = np.linalg.lstsq(a, dst - c_d, rcond=None)
    lin = sol.T
    return np.hstack([lin, (c_d - lin @ c_s)[:, None]])


def _fit_both_ways(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Mean of the b -> a fit and the inverse of the a -> b fit: neither slice's keypoint
    noise shrinks the scale (least squares attenuates the slope by the noise of its input)."""
    fwd = fit_affine(src, dst)
    bwd = np.vstack([fit_affine(dst, src), [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(bwd[:2, :2])) < 1e-9:
        return fwd
    return 0.5 * (fwd + np.linalg.inv(bwd)[:2])


def fit_rigid(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares rotation + translation (no scale) mapping src onto dst, 2x3 (x, y) px."""
    src = np.asarray(src_xy, np.float64)
    dst = np.asarray(dst_xy, np.float64)
    c_s, c_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - c_s, dst - c_d
    theta = np.arctan2(
        np.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]), np.sum(s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1])
    )
    c, n = np.cos(theta), np.sin(theta)
    lin = np.array([[c, -n], [n, c]])
    return np.hstack([lin, (c_d - lin @ c_s)[:, None]])


def fit_translation(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares translation mapping src onto dst, 2x3 (x, y) px."""
    t = np.mean(np.asarray(dst_xy, np.float64) - np.asarray(src_xy, np.float64), axis=0)
    return np.array([[1.0, 0.0, t[0]], [0.0, 1.0, t[1]]])


def linear_distortion(matrix: np.ndarray) -> tuple[float, float]:
    """Isotropic scale change and anisotropic stretch of a 2x3 matrix's linear part.

    Returns ``(sqrt(det L) - 1, (s1 - s2) / (s1 + s2))`` with ``s1 >= s2`` the singular
    values of ``L``; both are 0 for a rigid transform (dimensionless).
    """
    lin = np.asarray(matrix, np.float64)[:, :2]
    s = np.linalg.svd(lin, compute_uv=False)
    det = float(np.linalg.det(lin))
    scale = float(np.sqrt(det)) - 1.0 if det > 0 else float("inf")
    return scale, float((s[0] - s[1]) / (s[0] + s[1]))


def _corner_gap(m1: np.ndarray, m2: np.ndarray, shape_yx: tuple[int, int]) -> float:
    c = corner_points_xy(shape_yx)
    return float(np.max(np.linalg.norm(apply_affine(m1, c) - apply_affine(m2, c), axis=1)))


def failed_pair(
    z_a: int, z_b: int, reason: str, matches: int = 0, inliers: int = 0, downsample: int = 1
) -> PairResult:
    """A failed :class:`PairResult` (identity matrix, no residual) with its reason."""
    return PairResult(
        z_a,
        z_b,
        False,
        reason,
        "affine",
        _IDENTITY,
        _IDENTITY,
        inliers,
        matches,
        float("nan"),
        float("nan"),
        downsample,
    )


def _ratio_matches(
    fa: Features, fb: Features, config: MatchConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into fb, into fa) of descriptor matches passing the ratio test."""
    cv2.setRNGSeed(int(config.seed))
    if min(len(fa), len(fb)) > FLANN_MIN_KEYPOINTS:
        return _flann_ratio_matches(fa, fb, config.ratio)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(fb.descriptors, fa.descriptors, k=2)
    ib, ia = [], []
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < config.ratio * pair[1].distance:
            ib.append(pair[0].queryIdx)
            ia.append(pair[0].trainIdx)
    return np.asarray(ib, np.int64), np.asarray(ia, np.int64)


def _flann_ratio_matches(fa: Features, fb: Features, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_ratio_matches` by FLANN (4 KD-trees, 32 checks; the caller seeds OpenCV's RNG):
    the index and search of ``cv2.FlannBasedMatcher`` (same tree, same neighbours), its two
    nearest distances (sqrt of FLANN's squared L2 in float32) compared in float64 as
    ``DMatch.distance`` are, without 2 DMatch objects per keypoint: ~5 of ~60 ms per pair
    of 4000 keypoints."""
    index = cv2.flann_Index(fa.descriptors, {"algorithm": 1, "trees": 4})
    idx, dist2 = index.knnSearch(fb.descriptors, 2, params={"checks": 32})
    dist = np.sqrt(dist2).astype(np.float64)  # float32 sqrt, as the matcher's DMatch
    ok = (idx[:, 0] >= 0) & (idx[:, 1] >= 0) & (dist[:, 0] < ratio * dist[:, 1])
    return np.flatnonzero(ok).astype(np.int64), idx[ok, 0].astype(np.int64)


def match_features(
    fa: Features,
    fb: Features,
    *,
    z_a: int = 0,
    z_b: int = 1,
    config: MatchConfig = MatchConfig(),
    initial: np.ndarray | None = None,
    initial_close: bool = False,
) -> PairResult:
    """Fit the 2x3 transform (full-res (x, y) px) mapping slice ``z_b`` onto slice ``z_a``.

    SIFT: ratio-test kNN matching, RANSAC affine at the working-scale threshold,
    least-squares refit on the inliers, model choice and acceptance checks, retried on the
    coarse feature sets when both slices have them. Then, with ``config.area`` and area
    copies on both slices, the area matcher fits the pair from SIFT's estimate (or from
    its own coarse search) and its result is judged the same way (module docstring).

    Parameters
    ----------
    fa, fb : Features
        Features of slices ``z_a`` (target) and ``z_b`` (moving).
    z_a, z_b : int
        Slice indices recorded in the result.
    config : MatchConfig
        Thresholds and model policy.
    initial : numpy.ndarray, optional
        A 2x3 b -> a estimate (full-res px), e.g. composed from neighbouring links: the area
        matcher starts from it and SIFT is not run (falls back to a coarse search if the
        refinement fails).
    initial_close : bool
        ``initial`` is composed of SIFT fits that stand alone (:func:`sift_trusted`): the area
        matcher measures the patches once from it (one round on the sparse grid, no
        refinement rounds) instead of refining it until it settles.

    Returns
    -------
    PairResult
        ``ok=False`` with a reason when a check fails; never raises for bad data.
    """
    use_area = area_applies(fa, fb, config.area)
    sift = None
    if initial is None or not use_area:
        sift = _match_sift(fa, fb, z_a, z_b, config)
    if not use_area:
        return sift  # type: ignore[return-value]
    if sift is not None and sift_trusted(sift):
        return sift
    if initial is not None:
        starts = [(np.asarray(initial, np.float64), "area+"), (None, "area")]
    elif sift is not None and sift.ok:
        starts = [(sift.matrix_array, "sift+area"), (None, "area")]
    else:
        starts = [(None, "area")]
    reasons = [] if sift is None or sift.ok else [f"sift: {sift.reason}"]
    best: PairResult | None = None
    acfg = AreaConfig(seed=config.seed)
    for start, method in starts:
        # from a caller's estimate (second neighbours: composed links) the last round runs on
        # the sparse grid too: half the NCC searches of the pair (AreaConfig.final_sparse)
        cfg = replace(acfg, final_sparse=method == "area+")
        if method == "area+" and initial_close:
            # a close start (composed trusted SIFT links, 2-5 px from the area fit on the
            # benchmark stack): one round lands within 0.1-0.7 px of the refined fit, whose
            # content scatter is 4-9 px; a third of the NCC searches
            cfg = replace(cfg, max_rounds=0)
        fit = match_area(fa.area, fb.area, fa.area_factor, fb.shape_yx, initial=start, config=cfg)
        res = _area_result(fit, fb.shape_yx, config, z_a, z_b, fa.area_factor, method)
        if res.ok:
            return res
        reasons.append(f"{method}: {res.reason}")
        if best is None or res.inliers > best.inliers:
            best = res
    if sift is not None and sift.ok:
        return sift
    assert best is not None
    return replace(best, reason="; ".join(reasons))


def area_applies(fa: Features, fb: Features, area: bool = True) -> bool:
    """Whether :func:`match_features` fits the pair by area: area matching on (``area``) and
    both slices carry area copies of one shape and factor."""
    return (
        bool(area)
        and fa.area is not None
        and fb.area is not None
        and fa.area.shape == fb.area.shape
        and fa.area_factor == fb.area_factor
    )


def sift_trusted(p: PairResult) -> bool:
    """A SIFT fit good enough to stand without area refinement (``SIFT_TRUST_PX``)."""
    return (
        p.ok
        and p.method == "sift"
        and p.inliers >= SIFT_TRUST_INLIERS
        and p.residual_px <= SIFT_TRUST_PX * p.downsample
    )


def _match_sift(fa: Features, fb: Features, z_a: int, z_b: int, config: MatchConfig) -> PairResult:
    """SIFT pair fit at the working scale, then on the coarse feature sets if that fails."""
    first = _match_at_scale(fa, fb, z_a, z_b, config)
    if first.ok or not config.coarse_fallback:
        return first
    reasons = [first.reason]
    ca = fa.coarse_set()
    cb = fb.coarse_set() if ca is not None else None
    if ca is not None and cb is not None:
        coarse = replace(config, ratio=max(config.ratio, config.coarse_ratio))
        second = _match_at_scale(ca, cb, z_a, z_b, coarse)
        if second.ok:
            return second
        reasons.append(f"at {second.downsample}x: {second.reason}")
    return replace(first, reason="; ".join(reasons))


def _area_result(
    fit: AreaFit,
    shape_yx: tuple[int, int],
    config: MatchConfig,
    z_a: int,
    z_b: int,
    factor: int,
    method: str,
) -> PairResult:
    """An area fit as a PairResult: model choice and plausibility checks of :func:`judge_fit`."""
    if fit.points_b is None or fit.weights is None or not fit.ok:
        m = fit.matrix if fit.patches else np.eye(3)
        return replace(
            failed_pair(z_a, z_b, fit.reason, fit.patches, fit.inliers, factor),
            matrix=_as_tuple(m[:2]),
            affine=_as_tuple(m[:2]),
            method=method,
        )
    keep = fit.weights > 0
    res = judge_fit(
        fit.points_b[keep],
        fit.points_a[keep],
        fit.matrix[:2],
        shape_yx,
        config,
        z_a=z_a,
        z_b=z_b,
        matches=fit.patches,
        ds=factor,
        check_residual=False,
    )
    return replace(
        res,
        residual_px=float(fit.residual_px),
        method=method,
        support=_support(fit.points_b, fit.weights),
        scatter_px=_float_or_none(fit.scatter_px),
        fwd_bwd_px=_float_or_none(fit.fwd_bwd_px),
        ncc=_float_or_none(fit.ncc),
    )


def _support(points_xy: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, ...]:
    """``(weight, mean_x, mean_y, cov_xx, cov_xy, cov_yy)`` of weighted points (full-res px)."""
    p = np.asarray(points_xy, np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, np.float64)
    tot = float(w.sum())
    mu = (w[:, None] * p).sum(0) / tot
    d = p - mu
    c = (w[:, None, None] * (d[:, :, None] * d[:, None, :])).sum(0) / tot
    return (tot, float(mu[0]), float(mu[1]), float(c[0, 0]), float(c[0, 1]), float(c[1, 1]))


def _match_at_scale(
    fa: Features, fb: Features, z_a: int, z_b: int, config: MatchConfig
) -> PairResult:
    """:func:`match_features` on one feature set per slice, without the coarse fallback."""
    need = max(int(config.min_inliers), 3)
    ds = max(fa.downsample, fb.downsample)
    for z, f in ((z_a, fa), (z_b, fb)):
        if len(f) < need:
            return failed_pair(
                z_a, z_b, f"too few keypoints in slice {z} ({len(f)} < {need})", downsample=ds
            )
    ib, ia = _ratio_matches(fa, fb, config)
    n_matches = int(ib.size)
    if n_matches < need:
        return failed_pair(z_a, z_b, f"too few matches ({n_matches} < {need})", n_matches, 0, ds)
    pb = fb.keypoints_xy[ib].astype(np.float64)
    pa = fa.keypoints_xy[ia].astype(np.float64)
    thr = float(config.ransac_threshold_px) * ds
    cv2.setRNGSeed(int(config.seed))
    m0, mask = cv2.estimateAffine2D(
        pb,
        pa,
        method=cv2.RANSAC,
        ransacReprojThreshold=thr,
        maxIters=2000,
        confidence=0.999,
        refineIters=10,
    )
    if m0 is None or mask is None:
        return failed_pair(z_a, z_b, "RANSAC found no model", n_matches, 0, ds)
    inl = mask.ravel().astype(bool)
    affine = np.asarray(m0, np.float64)
    if inl.sum() >= 3:
        # least-squares refit on the RANSAC inliers, then on their core: content change
        # between sections biases the matches in the tail of the residual distribution
        affine = _fit_both_ways(pb[inl], pa[inl])
        res = np.linalg.norm(apply_affine(affine, pb) - pa, axis=1)
        core = inl & (res < max(REFIT_FLOOR_PX * ds, REFIT_MEDIANS * float(np.median(res[inl]))))
        if core.sum() >= max(3, int(config.min_inliers)):
            inl = core
            affine = _fit_both_ways(pb[inl], pa[inl])
    n_inl = int(inl.sum())
    if n_inl < need:
        return failed_pair(
            z_a, z_b, f"too few inliers ({n_inl} < {config.min_inliers})", n_matches, n_inl, ds
        )
    return judge_fit(
        pb[inl], pa[inl], affine, fb.shape_yx, config, z_a=z_a, z_b=z_b, matches=n_matches, ds=ds
    )


def judge_fit(
    src: np.ndarray,
    dst: np.ndarray,
    affine: np.ndarray,
    shape_yx: tuple[int, int],
    config: MatchConfig,
    *,
    z_a: int,
    z_b: int,
    matches: int,
    ds: int,
    check_residual: bool = True,
) -> PairResult:
    """Model choice and acceptance checks for inlier correspondences ``src`` (b) -> ``dst`` (a).

    ``src``/``dst`` are (N, 2) full-resolution (x, y) px, ``affine`` their 2x3 fit, ``matches``
    the candidates they were kept from and ``ds`` the working-scale factor (px thresholds of
    ``config`` are working px). ``check_residual=False`` skips the residual limit (area fits
    measure the content scatter and set their tolerance from it instead).
    """
    n_inl, n_matches = len(src), int(matches)
    fits = {
        "translation": fit_translation(src, dst),
        "rigid": fit_rigid(src, dst),
        "affine": affine,
    }
    gaps = {k: _corner_gap(v, affine, shape_yx) for k, v in fits.items()}
    if config.model == "auto":
        model = next(
            k for k in MODELS if gaps[k] < config.model_corner_threshold_px or k == "affine"
        )
    else:
        model = config.model
    chosen = fits[model]
    residual = float(np.sqrt(np.mean(np.sum((apply_affine(chosen, src) - dst) ** 2, axis=1))))
    scale, shear = linear_distortion(affine)
    h, w = shape_yx
    centre = np.array([[(w - 1) / 2.0, (h - 1) / 2.0]])
    shift = float(np.linalg.norm(apply_affine(chosen, centre) - centre))
    reason = ""
    if n_inl / n_matches < config.min_inlier_ratio:
        reason = f"inlier ratio too low ({n_inl}/{n_matches} < {config.min_inlier_ratio})"
    elif check_residual and residual / ds > config.max_residual_px:
        reason = f"residual too high ({residual / ds:.2f} > {config.max_residual_px} working px)"
    elif abs(scale) > config.max_scale_deviation:
        reason = f"scale change out of range (|{scale:.4f}| > {config.max_scale_deviation})"
    elif shear > config.max_shear:
        reason = f"shear out of range ({shear:.4f} > {config.max_shear})"
    elif shift > config.max_translation_fraction * max(h, w):
        reason = (
            f"translation out of range ({shift:.1f} px > "
            f"{config.max_translation_fraction} x {max(h, w)} px)"
        )
    return PairResult(
        int(z_a),
        int(z_b),
        reason == "",
        reason,
        model,
        _as_tuple(chosen),
        _as_tuple(affine),
        n_inl,
        n_matches,
        residual,
        gaps[model],
        ds,
        support=_support(src),
        scatter_px=float(residual / np.sqrt(2.0)),
    )


def match(a: np.ndarray, b: np.ndarray, **kw: Any) -> PairResult:
    """Notebook helper: features of two (y, x) slices and their pair fit (b -> a, full-res px).

    Keyword arguments ``downsample``, ``nfeatures``, ``z_a``, ``z_b``, ``config`` and
    ``initial`` are passed on; any :class:`MatchConfig` field name (e.g. ``model="rigid"``) overrides the
    config.
    """
    feat_kw = {k: kw.pop(k) for k in ("downsample", "nfeatures") if k in kw}
    z_a, z_b = int(kw.pop("z_a", 0)), int(kw.pop("z_b", 1))
    config = kw.pop("config", MatchConfig())
    initial = kw.pop("initial", None)
    names = {f.name for f in fields(MatchConfig)}
    unknown = set(kw) - names
    if unknown:
        raise TypeError(f"unknown argument(s) for match(): {sorted(unknown)}")
    config = replace(config, **kw)
    fa = compute_features(a, **feat_kw)
    fb = compute_features(b, **feat_kw)
    return match_features(fa, fb, z_a=z_a, z_b=z_b, config=config, initial=initial)
