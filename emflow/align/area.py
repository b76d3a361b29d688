"""Area-based pair matching: normalised cross-correlation of a grid of patches, robust affine fit.

Serial-section TEM neighbours 40-50 nm apart share their large structures (cell outlines,
organelles) but few SIFT-scale details, and their content moves by 3-7 px locally from one
section to the next (oblique neurites; notes/ALIGNMENT.md §4). Matching areas rather than
keypoints uses all of that shared structure:

1. **Coarse search** (only without an initial estimate): both slices at ~1/2 of the area copy
   (long side ~256 px), a central template of the moving slice rotated over ``±max_rotation``
   and correlated (OpenCV NCC) over the whole target; the best angle and shift, refined by
   parabolas, give a rigid estimate.
2. **Patch grid**: the moving slice is pre-warped by the current estimate; every patch of a
   regular grid is found in the other slice by NCC within a small search window (parabolic
   sub-pixel peak). This is done in both directions (patches of a in b, patches of b in a),
   each regressed the way round in which its grid coordinates are exact, so that neither
   direction's noise biases the scale; the two estimates are averaged. Repeated with a
   smaller window once the estimate is close (removes the peak-interpolation bias).
3. **Robust fit**: RANSAC, then Tukey-weighted least squares whose cut-off follows the measured
   scatter of the patch displacements (``tukey_sigmas`` x the robust sigma, floored), so the
   tolerance is what the sections' content allows rather than a fixed pixel count.

Core representation: the *area copy* of a slice is a uint8 ``(y, x)`` image reduced by an
integer factor ``g`` (block mean), grey levels stretched to 1..255, exact 0 where the slice
has fill (warped-in background). Its pixel ``u`` is centred on full-resolution ``x = g u +
(g - 1) / 2``. All matrices returned are 2x3 float64 in full-resolution ``(x, y)`` px mapping
slice ``b`` onto slice ``a`` (the :class:`~emflow.align.match.PairResult` convention).
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace

import cv2
import numpy as np

from emflow.align.affine import apply_affine, homogeneous
from emflow.align.stats import block_mean_percentiles

__all__ = [
    "AREA_LONG_SIDE_PX",
    "AreaConfig",
    "AreaFit",
    "area_copy",
    "area_factor",
    "coarse_search",
    "match_area",
    "patch_residuals",
]

#: The area copy is reduced by an integer factor so that its long side is >= this many px.
AREA_LONG_SIDE_PX = 512
#: The rounds before the last use a grid this many times sparser (a quarter of the patches).
SPARSE_STRIDE = 2
#: Zero regions (area px) smaller than this square are dark section pixels, not fill.
MIN_FILL_SIZE_PX = 5
#: Area copies with fewer valid pixels than this fraction cannot be matched.
MIN_VALID_FRACTION = 0.05


@dataclass(frozen=True)
class AreaConfig:
    """Settings of area-based matching; px are area-copy px unless named full-res."""

    patch_px: int = 64  # side of a correlation patch
    stride_px: int = 16  # grid step between patch centres (final round)
    search_px: int = 20  # half-width of the first search window (after a coarse estimate)
    # half-width in the refining rounds: it must hold the content scatter (ISBI: 1.8 px
    # sigma), or only the patches that agree with the current estimate are kept and the
    # rounds stall (4 px did); wider windows admit false peaks on 90 nm pairs (12-20 px did)
    refine_search_px: int = 8
    refine_rounds: int = 1  # sparse-grid rounds after the first, at least ...
    max_rounds: int = 8  # ... and at most, until the corners move less than settled_px
    # (0: no sparse rounds, the final round measures from the start estimate at once)
    settled_px: float = 0.2  # full-resolution px
    blur_px: float = 1.0  # Gaussian sigma applied before correlating
    min_ncc: float = 0.2  # patches whose peak NCC is lower are not used
    ransac_px: float = 6.0  # RANSAC inlier distance (area px)
    tukey_sigmas: float = 4.685  # Tukey cut-off in robust sigmas of the displacement scatter
    tukey_floor_px: float = 2.0  # ... but never below this (area px)
    # acceptance, measured on real VNC/ISBI pairs: inlier patches / patches tried per direction
    # are 0.35-0.9 for neighbours, 0.11-0.4 at 2 and 0.06-0.2 at 3 sections; a false lock
    # (refined from a wrong start) 0.02-0.07, with median inlier NCC 0.24-0.31 (true: >= 0.3)
    min_patches: int = 12  # inlier patches per direction needed to accept
    min_inlier_fraction: float = 0.08  # inlier patches / patches tried, per direction
    min_ncc_median: float = 0.3  # median peak NCC of the inlier patches
    max_rotation_deg: float = 6.0  # coarse search range
    rotation_step_deg: float = 1.0
    coarse_long_side_px: int = 256  # size of the coarse-search copy
    # the last round on the sparse grid too (a quarter of its NCC searches): for refining a
    # given estimate (second neighbours from composed links), where the rounds before it
    # already settled the fit from a close start
    final_sparse: bool = False
    seed: int = 0


@dataclass(frozen=True)
class AreaFit:
    """Result of :func:`match_area` (matrices b -> a, full-resolution (x, y) px).

    ``ok`` is False with ``reason`` when a check failed; ``matrix`` is then the best estimate
    reached (or the identity when there is none, ``patches == 0``). ``patches`` / ``inliers``
    count usable / inlier patches over both directions; ``residual_px`` is the Tukey-weighted
    RMS of the inlier displacements and ``scatter_px`` their robust sigma (full-res px);
    ``fwd_bwd_px`` is the largest corner gap between the two directions' estimates; ``ncc``
    the median peak NCC of the inlier patches. ``points_b``/``points_a`` (full-res px, (N, 2))
    are the patch correspondences of both directions and ``weights`` their Tukey weights.
    """

    ok: bool
    reason: str
    matrix: np.ndarray
    patches: int
    inliers: int
    residual_px: float
    scatter_px: float
    fwd_bwd_px: float
    ncc: float
    coarse: bool
    points_b: np.ndarray | None = None
    points_a: np.ndarray | None = None
    weights: np.ndarray | None = None


def area_factor(shape_yx: tuple[int, int]) -> int:
    """Integer reduction so the area copy's long side is in [512, 1024) px (1 below 1024)."""
    return max(1, max(int(shape_yx[0]), int(shape_yx[1])) // AREA_LONG_SIDE_PX)


def has_zero(image: np.ndarray) -> bool:
    """Whether a (y, x) slice has an exact-zero (fill) pixel; a slice without one skips the
    fill masks (at 4096², a mask and its reduction cost ~9 ms, the count ~0.6 ms)."""
    if image.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64):
        return cv2.countNonZero(image) < image.size
    return bool((image == 0).any())


def area_copy(image: np.ndarray, factor: int | None = None) -> tuple[np.ndarray, int]:
    """Reduced uint8 copy of a (y, x) slice for area matching (0 = fill), and its factor.

    Block mean by ``factor`` (default :func:`area_factor`); pixels at least half fill become
    0, the others are stretched to 1..255 between the 0.5 and 99.5 percentiles of the valid
    pixels (per-slice scaling is fine: NCC is invariant to it).
    """
    g = area_factor(image.shape) if factor is None else int(factor)
    h, w = (image.shape[0] // g) * g, (image.shape[1] // g) * g
    img = image[:h, :w]
    any_zero = has_zero(img)
    zero = (img == 0).view(np.uint8) if any_zero else None
    if g == 1:
        small = img.astype(np.float32)
        fill = zero.astype(bool) if zero is not None else np.zeros(img.shape, bool)
    else:
        size = (w // g, h // g)
        native = img if img.dtype in (np.uint8, np.uint16, np.float32) else img.astype(np.float32)
        small = cv2.resize(native, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        if zero is None:  # no fill: the block means of an all-zero mask are 0
            fill = np.zeros(small.shape, bool)
        else:
            fill = cv2.resize(zero * np.uint8(255), size, interpolation=cv2.INTER_AREA) >= 128
    # zero regions smaller than MIN_FILL_SIZE_PX² are dark pixels of the section, not fill
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (MIN_FILL_SIZE_PX, MIN_FILL_SIZE_PX))
    fill = cv2.morphologyEx(fill.view(np.uint8), cv2.MORPH_OPEN, k).astype(bool)
    out = np.zeros(small.shape, np.uint8)
    keep = ~fill
    if np.count_nonzero(keep) < 16:
        return out, g
    lo, hi = block_mean_percentiles(small, keep, [0.5, 99.5], img.dtype)
    if not hi > lo:
        return out, g
    scaled = np.clip(np.rint(1 + (small - lo) * (254.0 / (hi - lo))), 1, 255).astype(np.uint8)
    out[keep] = scaled[keep]
    return out, g


# ---- coordinates ---------------------------------------------------------------------------


def _to_full(g: float) -> np.ndarray:
    """3x3 map from copy px (reduced by ``g``) to full-resolution px."""
    return np.array([[g, 0.0, (g - 1) / 2.0], [0.0, g, (g - 1) / 2.0], [0.0, 0.0, 1.0]])


def _in_copy(m_full: np.ndarray, g: float) -> np.ndarray:
    """A full-resolution b -> a 3x3 matrix expressed in copy px."""
    p = _to_full(g)
    return np.linalg.inv(p) @ homogeneous(m_full) @ p


def _in_full(m_copy: np.ndarray, g: float) -> np.ndarray:
    p = _to_full(g)
    return p @ homogeneous(m_copy) @ np.linalg.inv(p)


def _corners(shape_yx: tuple[int, int]) -> np.ndarray:
    h, w = shape_yx
    return np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)


def _corner_gap(m1: np.ndarray, m2: np.ndarray, shape_yx: tuple[int, int]) -> float:
    h, w = shape_yx
    q = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    return float(np.max(np.linalg.norm(apply_affine(m1, q) - apply_affine(m2, q), axis=1)))


# ---- preparation ---------------------------------------------------------------------------


#: :func:`_prepared` results of this process by content (a slice's area copy is prepared by
#: each of its ~2 match2 and ~4 qc units, ~1.4 ms at 512²): ``(shape, blur, CRC-32) ->
#: (copy of the input, image, mask)``, a hit only when the input equals the kept copy;
#: least recently used first out, at most _PREPARED_KEEP_BYTES (6 bytes per px: 5 at 512²)
_PREPARED: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
_PREPARED_KEEP_BYTES = 8 << 20
_PREPARED_LOCK = threading.Lock()  # a worker's threads share it


def _prepared(copy_u8: np.ndarray, blur_px: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 image with fill replaced by the valid mean (no fill edges), blurred; valid mask.

    Both read-only; the same arrays again for an equal input (kept in ``_PREPARED``)."""
    u8 = np.ascontiguousarray(copy_u8)
    key = (u8.shape, u8.dtype.str, float(blur_px), zlib.crc32(u8))
    with _PREPARED_LOCK:
        got = _PREPARED.get(key)
        if got is not None and np.array_equal(got[0], u8):
            _PREPARED.move_to_end(key)
            return got[1], got[2]
    img, valid = _prepare(u8, blur_px)
    img.setflags(write=False)
    valid.setflags(write=False)
    with _PREPARED_LOCK:
        _PREPARED[key] = (u8.copy(), img, valid)
        total = sum(sum(a.nbytes for a in e) for e in _PREPARED.values())
        while total > _PREPARED_KEEP_BYTES and _PREPARED:
            total -= sum(a.nbytes for a in _PREPARED.popitem(last=False)[1])
    return img, valid


def _prepare(copy_u8: np.ndarray, blur_px: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_prepared` without the cache."""
    valid = copy_u8 > 0
    if not valid.all():  # interpolation darkens the px next to fill: keep clear of them
        k = 2 * int(np.ceil(blur_px)) + 3
        valid = cv2.erode(valid.view(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    img = copy_u8.astype(np.float32)
    if valid.any():
        img[~valid] = float(img[valid].mean())
    if blur_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), float(blur_px))
    return img, valid


def _warp(img: np.ndarray, m: np.ndarray, shape_yx: tuple[int, int], border: float) -> np.ndarray:
    """Render ``img`` into a frame of ``shape_yx`` with the forward 3x3 matrix ``m`` (copy px)."""
    return cv2.warpAffine(
        img,
        np.ascontiguousarray(m[:2]),
        (int(shape_yx[1]), int(shape_yx[0])),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border,
    )


def _warp_mask(valid: np.ndarray, m: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    v = _warp(valid.astype(np.float32), m, shape_yx, 0.0)
    return v > 0.999


# ---- coarse search -------------------------------------------------------------------------


def _parabola(ym: float, y0: float, yp: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through (-1, ym), (0, y0), (1, yp)."""
    den = ym - 2.0 * y0 + yp
    if den >= 0:
        return 0.0
    return min(0.5, max(-0.5, 0.5 * (ym - yp) / den))


def coarse_search(
    a_u8: np.ndarray, b_u8: np.ndarray, g: int, config: AreaConfig = AreaConfig()
) -> tuple[np.ndarray, float]:
    """Rigid b -> a estimate (3x3, full-res px) from rotated-template NCC, and its peak NCC.

    Both area copies are reduced to ~``coarse_long_side_px``; the central part of b
    (60 % of each side) is rotated over ``±max_rotation_deg`` and correlated with the whole
    of a, padded by a quarter of its size with its mean so shifts up to ~45 % of the slice
    are found.
    """
    k = max(1, max(a_u8.shape) // int(config.coarse_long_side_px))
    a_img, _ = _prepared(_reduce(a_u8, k), config.blur_px)
    b_img, _ = _prepared(_reduce(b_u8, k), config.blur_px)
    h, w = b_img.shape
    pad = max(h, w) // 4
    a_pad = cv2.copyMakeBorder(
        a_img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=float(a_img.mean())
    )
    th, tw = int(0.6 * h), int(0.6 * w)
    y0, x0 = (h - th) // 2, (w - tw) // 2
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    angles = np.arange(
        -config.max_rotation_deg, config.max_rotation_deg + 1e-9, config.rotation_step_deg
    )
    scores, peaks = [], []
    for ang in angles:
        rot = cv2.getRotationMatrix2D(centre, -float(ang), 1.0)  # matrix angle +ang
        b_rot = cv2.warpAffine(
            b_img, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        res = cv2.matchTemplate(a_pad, b_rot[y0 : y0 + th, x0 : x0 + tw], cv2.TM_CCOEFF_NORMED)
        _, best, _, loc = cv2.minMaxLoc(res)
        scores.append(best)
        peaks.append((res, loc))
    i = int(np.argmax(scores))
    di = 0.0
    if 0 < i < len(angles) - 1:
        di = _parabola(scores[i - 1], scores[i], scores[i + 1])
    ang = float(angles[i] + di * config.rotation_step_deg)
    res, (lx, ly) = peaks[i]
    dx = dy = 0.0
    if 0 < lx < res.shape[1] - 1:
        dx = _parabola(res[ly, lx - 1], res[ly, lx], res[ly, lx + 1])
    if 0 < ly < res.shape[0] - 1:
        dy = _parabola(res[ly - 1, lx], res[ly, lx], res[ly + 1, lx])
    # b_rot(p) = b(R^-1 p); the template's pixel (x0, y0) lies at (lx - pad, ly - pad) in a
    rot = homogeneous(cv2.getRotationMatrix2D(centre, -ang, 1.0))
    shift = np.array([[1.0, 0.0, lx + dx - pad - x0], [0.0, 1.0, ly + dy - pad - y0], [0, 0, 1]])
    m_coarse = shift @ rot  # b coarse px -> a coarse px
    return _in_full(m_coarse, g * k), float(scores[i])


def _reduce(u8: np.ndarray, k: int) -> np.ndarray:
    """Block mean by ``k`` keeping 0 for blocks that are mostly fill."""
    if k == 1:
        return u8
    h, w = (u8.shape[0] // k) * k, (u8.shape[1] // k) * k
    size = (w // k, h // k)
    small = cv2.resize(u8[:h, :w], size, interpolation=cv2.INTER_AREA)
    fill = cv2.resize(
        (u8[:h, :w] == 0).view(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_AREA
    )
    return np.where(fill >= 128, 0, np.maximum(small, 1)).astype(np.uint8)


# ---- patch grid ----------------------------------------------------------------------------


def _grid(shape_yx: tuple[int, int], patch: int, stride: int, margin: int) -> np.ndarray:
    """Top-left corners (x, y) of patches on a regular grid, centred in the slice."""
    h, w = shape_yx
    lo = margin
    out = []
    for size in (w, h):
        span = size - 2 * lo - patch
        if span < 0:
            return np.zeros((0, 2), np.int64)
        k = span // stride
        start = lo + (span - k * stride) // 2
        out.append(start + stride * np.arange(k + 1))
    xs, ys = np.meshgrid(out[0], out[1])
    return np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)


def _displacements(
    fixed: np.ndarray,
    fixed_valid: np.ndarray,
    moving: np.ndarray,
    moving_valid: np.ndarray,
    patch: int,
    stride: int,
    search: int,
    min_ncc: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Where each grid patch of ``fixed`` lies in ``moving`` (same frame, copy px).

    Returns patch centres ``(N, 2)`` in ``fixed``, their displacements ``(N, 2)`` (content
    at ``c`` in fixed is at ``c + d`` in moving) and peak NCCs, for usable patches only, and
    how many patches were tried (grid patches whose window lies in both slices).
    """
    corners = _grid(fixed.shape, patch, stride, search)
    win = patch + 2 * search
    # fraction of valid px per patch / window via integral images, for the whole grid at once
    full = _boxes(cv2.integral(fixed_valid.view(np.uint8)), corners, patch) >= patch * patch
    inside = _boxes(cv2.integral(moving_valid.view(np.uint8)), corners - search, win)
    tried_xy = corners[full & (inside >= 0.98 * win * win)]
    found = []  # (x, y, lx, ly, peak NCC) and the 3x3 NCC values around each peak
    around = []
    for x, y in tried_xy.tolist():
        t = fixed[y : y + patch, x : x + patch]
        s = moving[y - search : y - search + win, x - search : x - search + win]
        r = cv2.matchTemplate(s, t, cv2.TM_CCOEFF_NORMED)
        _, best, _, (lx, ly) = cv2.minMaxLoc(r)
        if not best >= min_ncc:
            continue
        if lx in (0, r.shape[1] - 1) or ly in (0, r.shape[0] - 1):
            continue  # peak on the window border: the true one may lie outside
        found.append((x, y, lx, ly, best))
        around.append(r[ly - 1 : ly + 2, lx - 1 : lx + 2])
    if not found:
        empty = np.zeros((0, 2), np.float64)
        return empty, empty.copy(), np.zeros(0, np.float64), len(tried_xy)
    f = np.asarray(found, np.float64)
    v = np.asarray(around, np.float64)  # (N, 3, 3) around each peak, [row, col]
    ox = _peak_offsets(v[:, 1, 0], v[:, 1, 1], v[:, 1, 2])
    oy = _peak_offsets(v[:, 0, 1], v[:, 1, 1], v[:, 2, 1])
    centres = f[:, :2] + (patch - 1) / 2.0
    shifts = np.column_stack([f[:, 2] + ox - search, f[:, 3] + oy - search])
    return centres, shifts, f[:, 4].copy(), len(tried_xy)


def _boxes(ii: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """Sums of an integral image ``ii`` over ``size``² boxes with top-left corners ``xy``
    ``(N, 2)``, clipped to the image (0 for boxes wholly outside)."""
    x, y = xy[:, 0], xy[:, 1]
    x0, y0 = np.maximum(x, 0), np.maximum(y, 0)
    x1 = np.minimum(x + size, ii.shape[1] - 1)
    y1 = np.minimum(y + size, ii.shape[0] - 1)
    ok = (x1 > x0) & (y1 > y0)
    x0, x1 = np.where(ok, x0, 0), np.where(ok, x1, 0)
    y0, y1 = np.where(ok, y0, 0), np.where(ok, y1, 0)
    sums = ii[y1, x1].astype(np.int64) - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return np.where(ok, sums, 0)


def _parabolas(ym: np.ndarray, y0: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """:func:`_parabola` for arrays of samples (the same float64 operations)."""
    den = ym - 2.0 * y0 + yp
    peak = den < 0
    off = np.zeros(den.shape, np.float64)
    off[peak] = np.minimum(0.5, np.maximum(-0.5, 0.5 * (ym[peak] - yp[peak]) / den[peak]))
    return off


def _peak_offsets(ym: np.ndarray, y0: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Sub-pixel offsets of correlation peaks from three samples each: a Gaussian through
    them (a parabola through their logarithms), which lags the true peak less than a
    parabola on correlation peaks a few px wide; the parabola where a value is not positive.
    Logarithms by ``math.log`` (the same values as a scalar computation)."""
    pos = (ym > 0) & (y0 > 0) & (yp > 0)
    logs = [ym.copy(), y0.copy(), yp.copy()]
    for a in logs:
        a[pos] = list(map(math.log, a[pos].tolist()))
    return np.where(pos, _parabolas(*logs), _parabolas(ym, y0, yp))


def _fit_affine_weighted(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares 3x3 affine mapping src onto dst."""
    sw = np.sqrt(w)[:, None]
    c_s = (w[:, None] * src).sum(0) / w.sum()
    c_d = (w[:, None] * dst).sum(0) / w.sum()
    sol, *_ = np.linalg.lstsq((src - c_s) * sw, (dst - c_d) * sw, rcond=None)
    lin = sol.T
    return homogeneous(np.hstack([lin, (c_d - lin @ c_s)[:, None]]))


def _robust_fit(
    src: np.ndarray, dst: np.ndarray, config: AreaConfig, scale: float
) -> tuple[np.ndarray | None, np.ndarray, float]:
    """RANSAC then Tukey IRLS affine (3x3) src -> dst; Tukey weights; robust sigma.

    ``scale`` converts the config's px into the units of the points.
    """
    n = len(src)
    if n < 3:
        return None, np.zeros(n), float("nan")
    cv2.setRNGSeed(int(config.seed))
    m0, mask = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=float(config.ransac_px) * scale,
        maxIters=2000,
        confidence=0.999,
        refineIters=0,
    )
    if m0 is None or mask is None or mask.sum() < 3 or abs(np.linalg.det(m0[:, :2])) < 0.5:
        return None, np.zeros(n), float("nan")
    w = mask.ravel().astype(np.float64)
    m = _fit_affine_weighted(src, dst, w)
    sigma = float("nan")
    for _ in range(10):
        r = np.linalg.norm(apply_affine(m, src) - dst, axis=1)
        core = r[w > 0]
        # robust sigma per component from the median residual length (Rayleigh: med = 1.1774 s)
        sigma = float(np.median(core)) / 1.1774 if core.size else float("nan")
        c = max(float(config.tukey_floor_px) * scale, float(config.tukey_sigmas) * sigma)
        w_new = np.where(r < c, (1.0 - (r / c) ** 2) ** 2, 0.0)
        if np.count_nonzero(w_new) < 3:
            break
        m_new = _fit_affine_weighted(src, dst, w_new)
        if not abs(np.linalg.det(m_new[:2, :2])) > 0.5:
            break
        done = np.max(np.abs(m_new - m)[:2, :2]) < 1e-7 and np.max(np.abs(m_new - m)[:2, 2]) < 1e-4
        m, w = m_new, w_new
        if done:
            break
    return m, w, sigma


@dataclass(frozen=True)
class _Direction:
    m: np.ndarray | None  # b -> a, copy px (3x3)
    weights: np.ndarray
    sigma: float
    ncc: np.ndarray
    usable: int
    tried: int = 0  # grid patches inside both slices
    grid: np.ndarray | None = None  # patch centres on the grid (copy px of the grid's slice)
    found: np.ndarray | None = None  # where they were found in the other slice (copy px)


def _one_direction(
    fixed: np.ndarray,
    fixed_valid: np.ndarray,
    moving: np.ndarray,
    moving_valid: np.ndarray,
    m_fm: np.ndarray,
    search: int,
    config: AreaConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Patches of ``fixed`` found in ``moving``: (fixed points, moving points, ncc, tried),
    points in copy px (see :func:`_displacements`).

    ``m_fm`` (3x3) maps fixed px to moving px (the current estimate).
    """
    # render moving in the fixed frame: warped(p) = moving(m_fm p)
    border = float(moving.mean())
    inv = np.linalg.inv(m_fm)
    warped = _warp(moving, inv, fixed.shape, border)
    warped_valid = _warp_mask(moving_valid, inv, fixed.shape)
    c, d, ncc, tried = _displacements(
        fixed,
        fixed_valid,
        warped,
        warped_valid,
        config.patch_px,
        config.stride_px,
        search,
        config.min_ncc,
    )
    return c, apply_affine(m_fm, c + d), ncc, tried


def match_area(
    a_u8: np.ndarray,
    b_u8: np.ndarray,
    g: int,
    shape_yx: tuple[int, int],
    *,
    initial: np.ndarray | None = None,
    config: AreaConfig = AreaConfig(),
) -> AreaFit:
    """Affine b -> a (full-res px) from patch NCC in both directions (module docstring).

    Parameters
    ----------
    a_u8, b_u8 : numpy.ndarray
        Area copies (:func:`area_copy`) of slices a (target) and b (moving), same factor.
    g : int
        Their reduction factor.
    shape_yx : tuple of int
        Full-resolution slice shape (for corner distances).
    initial : numpy.ndarray, optional
        2x3 b -> a estimate (full-res px), e.g. from SIFT; without one a coarse rotation
        search provides it.
    config : AreaConfig
        Patch grid and acceptance settings.
    """
    for name, u8 in (("a", a_u8), ("b", b_u8)):
        if np.count_nonzero(u8) < MIN_VALID_FRACTION * u8.size:
            return _failed(f"slice {name} is (almost) empty", np.eye(3), 0, 0, initial is None)
    config = _scaled(config, max(a_u8.shape))
    coarse = initial is None
    m_full = coarse_search(a_u8, b_u8, g, config)[0] if coarse else homogeneous(initial)
    a_img, a_valid = _prepared(a_u8, config.blur_px)
    b_img, b_valid = _prepared(b_u8, config.blur_px)
    m = _in_copy(m_full, g)  # b -> a, copy px
    search = config.search_px if coarse else max(config.search_px // 2, config.refine_search_px)
    fwd = bwd = _Direction(None, np.zeros(0), float("nan"), np.zeros(0), 0, 0)
    corners = _corners(a_u8.shape)
    sparse = replace(config, stride_px=config.stride_px * SPARSE_STRIDE)

    def both_ways(cfg: AreaConfig, m: np.ndarray) -> tuple[_Direction, _Direction]:
        # forward: patches of a (exact grid) found in b; regressing b on a gives a -> b
        fwd = _fit_direction(
            _one_direction(a_img, a_valid, b_img, b_valid, np.linalg.inv(m), search, cfg), cfg
        )
        # backward: patches of b (exact grid) found in a; regressing a on b gives b -> a
        bwd = _fit_direction(_one_direction(b_img, b_valid, a_img, a_valid, m, search, cfg), cfg)
        return fwd, bwd

    # rounds on a sparser grid until the estimate settles (each round starts where the last
    # ended: sub-pixel peaks lag the true residual motion, so strongly distorted pairs need a
    # few), then one round on the full grid gives the result
    last_step = float("inf")
    settled = False
    for i in range(int(config.max_rounds)):
        fwd, bwd = both_ways(sparse, m)
        if fwd.m is None or bwd.m is None:
            break
        new = 0.5 * (np.linalg.inv(fwd.m) + bwd.m)
        step = float(
            np.max(np.linalg.norm(apply_affine(new, corners) - apply_affine(m, corners), axis=1))
        )
        search = config.refine_search_px
        if i > config.refine_rounds and step >= 0.8 * last_step:
            m = 0.5 * (m + new)  # not settling (patches flip between two peaks): the mean
            break
        m, last_step = new, step
        if i >= config.refine_rounds and step * g <= config.settled_px:
            settled = True
            break
    if settled and config.final_sparse:
        # the last round ran on the final round's grid and window and moved the estimate by
        # at most settled_px: it is the final round (a repeat from here moves it by less)
        return _judge(fwd, bwd, m, g, shape_yx, config, coarse)
    fwd, bwd = both_ways(sparse if config.final_sparse else config, m)
    if fwd.m is not None and bwd.m is not None:
        m = 0.5 * (np.linalg.inv(fwd.m) + bwd.m)
    return _judge(fwd, bwd, m, g, shape_yx, config, coarse)


def _scaled(config: AreaConfig, long_side: int) -> AreaConfig:
    """Patch grid shrunk in proportion for area copies smaller than ``AREA_LONG_SIDE_PX``
    (slices under 512 px), so that they still hold a few hundred patches."""
    f = min(1.0, long_side / AREA_LONG_SIDE_PX)
    if f >= 1.0:
        return config
    return replace(
        config,
        patch_px=max(16, round(config.patch_px * f)),
        stride_px=max(6, round(config.stride_px * f)),
        search_px=max(6, round(config.search_px * f)),
    )


def _failed(reason: str, m_full: np.ndarray, patches: int, inliers: int, coarse: bool) -> AreaFit:
    nan = float("nan")
    return AreaFit(False, reason, m_full, patches, inliers, nan, nan, nan, nan, coarse)


def _fit_direction(
    found: tuple[np.ndarray, np.ndarray, np.ndarray, int], config: AreaConfig
) -> _Direction:
    grid_pts, other_pts, ncc, tried = found
    m, w, sigma = _robust_fit(grid_pts, other_pts, config, 1.0)
    return _Direction(m, w, sigma, ncc, len(grid_pts), tried, grid_pts, other_pts)


def _judge(
    fwd: _Direction,
    bwd: _Direction,
    m: np.ndarray,
    g: int,
    shape_yx: tuple[int, int],
    config: AreaConfig,
    coarse: bool,
) -> AreaFit:
    """Acceptance of a two-direction fit; ``m`` (3x3, copy px) is the combined estimate."""
    usable = fwd.usable + bwd.usable
    tried = fwd.tried + bwd.tried
    inl = [int(np.count_nonzero(d.weights)) for d in (fwd, bwd)]
    m_full = _in_full(m, g)
    if fwd.m is None or bwd.m is None:
        return _failed(
            f"too few correlated patches ({usable} of {tried})", m_full, tried, sum(inl), coarse
        )
    gap = _corner_gap(_in_full(np.linalg.inv(fwd.m), g), _in_full(bwd.m, g), shape_yx)
    w_all = np.concatenate([fwd.weights, bwd.weights])
    ncc_all = np.concatenate([fwd.ncc, bwd.ncc])
    ncc = float(np.median(ncc_all[w_all > 0])) if np.any(w_all > 0) else float("nan")
    sig = 0.5 * (fwd.sigma + bwd.sigma) * g
    resid = sig * np.sqrt(2.0)  # RMS length of a 2D residual with sigma per component
    reason = ""
    for d, n_in in zip((fwd, bwd), inl, strict=True):
        if n_in < config.min_patches:
            reason = f"too few inlier patches ({n_in} < {config.min_patches})"
        elif n_in < config.min_inlier_fraction * d.tried:
            reason = f"too few patches agree ({n_in} of {d.tried} < {config.min_inlier_fraction:g})"
        if reason:
            break
    if not reason and not ncc >= config.min_ncc_median:
        reason = f"patches correlate poorly (median NCC {ncc:.2f} < {config.min_ncc_median})"
    pb = np.vstack([fwd.found, bwd.grid]) * g + (g - 1) / 2.0
    pa = np.vstack([fwd.grid, bwd.found]) * g + (g - 1) / 2.0
    return AreaFit(
        reason == "", reason, m_full, tried, sum(inl), resid, sig, gap, ncc, coarse, pb, pa, w_all
    )


def patch_residuals(
    a_u8: np.ndarray,
    b_u8: np.ndarray,
    g: int,
    m_full: np.ndarray,
    *,
    config: AreaConfig = AreaConfig(),
    search_px: int = 8,
    stride_px: int | None = None,
) -> np.ndarray:
    """Residual displacements (full-res px, (N, 2)) of a patch grid of b after mapping by ``m_full``.

    For QC after alignment: ``m_full`` (2x3, b -> a) is what the solved transforms say; the
    residuals are what the content says is left (no fitting here). The grid is the sparse
    rounds' (``stride_px`` default: ``SPARSE_STRIDE`` x ``config.stride_px``, ~190 patches
    for a 512² area copy): a quarter of the fitting grid's NCC searches, and the medians the
    QC reports (per link and over the stack) move by a fraction of a px (≤ 0.06 px over the
    stack on VNC and the 2048² benchmark slices, ≤ 0.4 px for a single link).
    """
    stride = config.stride_px * SPARSE_STRIDE if stride_px is None else int(stride_px)
    config = replace(config, stride_px=stride)
    a_img, a_valid = _prepared(a_u8, config.blur_px)
    b_img, b_valid = _prepared(b_u8, config.blur_px)
    grid_pts, other_pts, _, _ = _one_direction(
        b_img, b_valid, a_img, a_valid, _in_copy(m_full, g), search_px, config
    )
    if not len(grid_pts):
        return np.zeros((0, 2))
    m = _in_copy(m_full, g)
    return (other_pts - apply_affine(m, grid_pts)) * g
