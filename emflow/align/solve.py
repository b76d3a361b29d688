"""Turn pairwise matches into one source->global 2x3 transform per slice and a global frame.

Core representation: :class:`Alignment` maps each z to a 2x3 float64 matrix in
full-resolution ``(x, y)`` pixel coordinates taking slice z into the global aligned frame
(pixel centres at integers), shifted so that the output frame starts at (0, 0);
``frame_shape_yx`` is its size: the slice size on the stack's mean content position by
default, or the bounding box of all rendered slices (:mod:`emflow.align.frame`). A pair ``(z_a, z_b)`` with matrix
``M`` (b -> a) states ``T_b = T_a M``.

Methods
-------
``"chain"``
    Reference behaviour: ``T_z = T_a M_(a, z)`` with ``a`` the nearest earlier placed slice
    that has a successful link to z (normally z-1; z-2 bridges a failed z-1).
``"global"``
    Linear least squares over every successful link (first and second neighbours, bridges):
    each link asks that ``T_a(M p) = T_b(p)`` where its matches lie in slice b (three
    points spanning their mean and covariance, ``PairResult.support``; the 4 corners when
    unknown). A (z, z+1) link has weight 1; longer links ``SECOND_NEIGHBOUR_WEIGHT``
    (sections 90-100 nm apart differ most, notes/ALIGNMENT.md §4) unless no (z, z+1) link
    crosses the same place, then 1. Links that disagree with the solution by more than
    ``max(outlier_px, 3.5 x the median of links of their kind)`` (RMS px over their
    matches) are rejected and reported.

Links are weighted by the inverse square of their measured scatter (``PairResult.scatter_px``,
relative to the slice size; ``REFERENCE_SCATTER`` has weight 1), so exact links (FIB-SEM,
synthetic) are stiff and the regulariser only decides what uncertain links leave open.

Drift control (``regularisation`` = λ, recipe ``align.regularisation``): every slice's linear
part, averaged over a window of ±``REGULARISATION_WINDOW`` slices, is pulled toward rigid
with weight λ (relative to one (z, z+1) link of reference scatter) and its isotropic scale
toward 1 with weight ``SCALE_WEIGHT`` x λ. Real sections are not affinely related (content moves 3-7 px between
neighbours), so unregularised affine links random-walk in scale and shear (2-10 % over 20-30
sections of VNC/ISBI). Independent per-slice distortions (a slice's own misplacement) average
out over the window and are kept; drift accumulated along z does not and is removed. The
default λ = 0.03 was chosen from the robustness/drift measurements in
benchmarks/align_quality.py (README, alignment paragraph).

Trend removal (``detrend``, recipe ``align.detrend``, default ``"rigid"``): what drift control
leaves is a slow turn and walk of the whole stack (VNC: ~0.1° and a few px per section, frame
+3-5 % over 20 sections), which pairwise matching cannot tell from a true one;
:func:`emflow.align.trend.detrend` removes its linear trend in z, measured on each slice's
non-fill footprint so that it follows the content, not the canvas (the misplacement
robustness of the stack holds with it). The stack's mean placement is then the identity.
With ``"none"`` the output is only turned so that the slices' mean rotation is zero.

Bad slices (given by the caller, e.g. from :func:`emflow.align.quality.assess_slice`, or
found here because none of their links succeeded) never constrain the solution; the
``bad_slice_policy`` says what is rendered in their place. A *gap* is a place between two
consecutive usable slices that no (z, z+1) link crosses; longer links bridge it, and a gap
counts as bridged only when at least ``BRIDGE_MIN_LINKS`` links that agree with each other
cross it, or one fit of sub-pixel consensus (:func:`_self_evident`); otherwise it is
unchecked (a link across 90+ nm of tissue is the least reliable in the stack). An unbridged
gap stops the solve with an :class:`AlignmentError` naming it,
unless ``allow_segments``: then each part is solved on its own and a later part is placed by
the best estimate that crosses the gap (an unchecked link, or a failed pair's estimate),
reported in ``Alignment.segment_breaks``; a part that no estimate reaches is an error
(never placed with the identity).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emflow.align.affine import apply_affine, homogeneous
from emflow.align.frame import DEFAULT_FRAME, FRAMES, cropped_fractions, frame_box
from emflow.align.match import (
    SIFT_TRUST_INLIERS,
    SIFT_TRUST_PX,
    PairResult,
    corner_points_xy,
)
from emflow.align.trend import DETREND
from emflow.align.trend import detrend as _detrend
from emflow.errors import AlignmentError

__all__ = ["BAD_SLICE_POLICIES", "METHODS", "Alignment", "identity_alignment", "solve"]

METHODS = ("global", "chain")
BAD_SLICE_POLICIES = ("bridge", "fill_previous", "zero", "error")
FORMAT = "emflow-alignment"
#: Weight of the rows that anchor the reference slice (gauge), relative to one link.
ANCHOR_WEIGHT = 1000.0
VERSION = 1
#: Default drift control λ (recipe ``align.regularisation``), see the module docstring.
DEFAULT_REGULARISATION = 0.03
#: Default trend removal (recipe ``align.detrend``), see :mod:`emflow.align.trend`.
DEFAULT_DETREND = "rigid"
#: Half-width (slices) of the window over which the regulariser averages linear parts.
REGULARISATION_WINDOW = 3
#: Weight of the isotropic-scale term relative to the rigid term.
SCALE_WEIGHT = 20.0
#: A link whose matches scatter about it by this fraction of the slice half-diagonal (per
#: axis) has weight 1 (typical of real (z, z+1) ssTEM links: VNC 0.33 %, ISBI 0.47 %);
#: weights go with the inverse square of the scatter, so exact links barely feel λ.
REFERENCE_SCATTER = 0.0033
#: Scatter (px) below which a link is not trusted more (weights stay finite).
MIN_SCATTER_PX = 0.05
#: Weight of links between slices 2+ sections apart, relative to a (z, z+1) link.
SECOND_NEIGHBOUR_WEIGHT = 0.1
#: Agreeing links needed across a gap (a place no (z, z+1) link crosses).
BRIDGE_MIN_LINKS = 2
#: Regulariser iterations (the rotation targets are refreshed between them).
ITERATIONS = 8
KINDS = ("neighbour", "second", "bridge")


def pair_kind(pair: PairResult) -> str:
    """``"neighbour"`` (z, z+1), ``"second"`` (z, z+2) or ``"bridge"`` (3+ apart)."""
    d = pair.distance
    return "neighbour" if d == 1 else "second" if d == 2 else "bridge"


@dataclass(frozen=True, eq=False)
class Alignment:
    """Per-slice source->global 2x3 transforms (full-res (x, y) px) and the global frame.

    Attributes
    ----------
    transforms : dict of int to numpy.ndarray
        z -> 2x3 float64, slice px -> global px; the frame's bounding box starts at 0.
        Bad slices have one too (interpolated from neighbours, or the previous good slice's
        for ``"fill_previous"``), see :meth:`source_slice`.
    frame_shape_yx : tuple of int
        Global frame ``(height, width)`` px covering every rendered slice.
    method : str
        ``"global"``, ``"chain"`` or ``"identity"``.
    bad_slices : dict of int to str
        z -> reason the slice was not used for alignment.
    rejected_pairs : list of (int, int, str)
        Links not used: failed matches and links rejected by the solver, with reasons.
    pairs : list of PairResult
        All pair results given to the solver (QC).
    bad_slice_policy : str
        ``"bridge"``, ``"fill_previous"`` or ``"zero"``: what the renderer shows for bad slices.
    segment_breaks : list of (int, int)
        ``(z_prev, z_next)`` of gaps no checked link crosses, when segments were allowed:
        the later part was placed by the estimate named in ``gaps`` (expect a jump there).
    gaps : list of dict
        Every gap (place between consecutive usable slices that no (z, z+1) link crosses):
        ``{"after": z_prev, "before": z_next, "links": [[z_a, z_b], ...] (used crossing
        links), "status": "bridged" | "unchecked" | "unbridged", "placed_by": str}``.
    regularisation : float
        The drift-control weight λ the transforms were solved with.
    detrend : str
        ``"rigid"`` when the low-order trend of rotation and position was removed, else
        ``"none"`` (:mod:`emflow.align.trend`).
    frame : str
        ``"slice"`` (the frame has the slice size, on the stack's mean content) or
        ``"union"`` (it covers every rendered slice), :mod:`emflow.align.frame`.
    cropped : dict of int to float
        z -> fraction of that slice's area outside the frame (only slices with ≥ 0.05 %).
    """

    transforms: dict[int, np.ndarray]
    frame_shape_yx: tuple[int, int]
    method: str
    bad_slices: dict[int, str] = field(default_factory=dict)
    rejected_pairs: list[tuple[int, int, str]] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    bad_slice_policy: str = "bridge"
    segment_breaks: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    regularisation: float = 0.0
    detrend: str = "none"
    frame: str = "union"
    cropped: dict[int, float] = field(default_factory=dict)

    def source_slice(self, z: int) -> int | None:
        """Which source slice the renderer warps (with ``transforms[z]``) for output z.

        ``z`` itself for good slices and under ``"bridge"``; the previous good slice (the
        next one at the start of the stack) under ``"fill_previous"``; None (render zeros)
        under ``"zero"``.
        """
        if z not in self.bad_slices or self.bad_slice_policy == "bridge":
            return z
        if self.bad_slice_policy == "zero":
            return None
        good = [g for g in sorted(self.transforms) if g not in self.bad_slices]
        before = [g for g in good if g < z]
        if before:
            return before[-1]
        after = [g for g in good if g > z]
        return after[0] if after else None

    def pair_status(self, pair: PairResult) -> str:
        """``"matched"`` (used), ``"failed"`` (no acceptable fit) or ``"rejected"`` (fitted,
        not used: inconsistent with the other links, or touching a bad slice)."""
        if not pair.ok:
            return "failed"
        rejected = {(a, b) for a, b, _ in self.rejected_pairs}
        return "rejected" if (pair.z_a, pair.z_b) in rejected else "matched"

    def pair_summary(self) -> dict[str, dict[str, int]]:
        """Counts of pairs by kind (``KINDS``) and status (matched / failed / rejected)."""
        rejected = {(a, b) for a, b, _ in self.rejected_pairs}
        out = {k: {"matched": 0, "failed": 0, "rejected": 0} for k in KINDS}
        for p in self.pairs:
            status = (
                "failed" if not p.ok else "rejected" if (p.z_a, p.z_b) in rejected else "matched"
            )
            out[pair_kind(p)][status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (floats exact: json writes them with repr)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "frame_shape_yx": [int(v) for v in self.frame_shape_yx],
            "bad_slice_policy": self.bad_slice_policy,
            "regularisation": float(self.regularisation),
            "detrend": self.detrend,
            "frame": self.frame,
            "cropped": {str(z): float(v) for z, v in sorted(self.cropped.items())},
            "transforms": {
                str(z): [[float(v) for v in row] for row in np.asarray(m, np.float64)]
                for z, m in sorted(self.transforms.items())
            },
            "bad_slices": {str(z): r for z, r in sorted(self.bad_slices.items())},
            "rejected_pairs": [[int(a), int(b), str(r)] for a, b, r in self.rejected_pairs],
            "pairs": [p.to_dict() for p in self.pairs],
            "segment_breaks": [[int(a), int(b)] for a, b in self.segment_breaks],
            "gaps": [dict(g) for g in self.gaps],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "alignment") -> Alignment:
        """Inverse of :meth:`to_dict`; raises AlignmentError naming the bad field."""
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise AlignmentError(
                f"{where}: not an {FORMAT} v{VERSION} file (format={d.get('format')!r}, "
                f"version={d.get('version')!r}); re-run the alignment to regenerate it"
            )
        try:
            transforms = {int(z): np.array(m, dtype=np.float64) for z, m in d["transforms"].items()}
            for z, m in transforms.items():
                if m.shape != (2, 3) or not np.all(np.isfinite(m)):
                    raise ValueError(f"transforms[{z}] must be a finite 2x3 matrix")
            shape = d["frame_shape_yx"]
            return cls(
                transforms=transforms,
                frame_shape_yx=(int(shape[0]), int(shape[1])),
                method=str(d["method"]),
                bad_slices={int(z): str(r) for z, r in d.get("bad_slices", {}).items()},
                rejected_pairs=[
                    (int(a), int(b), str(r)) for a, b, r in d.get("rejected_pairs", [])
                ],
                pairs=[PairResult.from_dict(p) for p in d.get("pairs", [])],
                bad_slice_policy=str(d.get("bad_slice_policy", "bridge")),
                segment_breaks=[(int(a), int(b)) for a, b in d.get("segment_breaks", [])],
                gaps=[dict(g) for g in d.get("gaps", [])],
                regularisation=float(d.get("regularisation", 0.0)),
                detrend=str(d.get("detrend", "none")),
                frame=str(d.get("frame", "union")),
                cropped={int(z): float(v) for z, v in d.get("cropped", {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise AlignmentError(f"{where}: invalid content ({e}); re-run the alignment") from e

    def to_json(self, path: str | Path) -> None:
        """Write alignment.json (lossless; floats via repr)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Alignment:
        """Read an alignment.json written by :meth:`to_json`."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AlignmentError(f"{p}: cannot read alignment file ({e}); check the path") from e
        return cls.from_dict(d, where=str(p))

    def _repr_html_(self) -> str:
        from emflow.reprs import alignment_html

        return alignment_html(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Alignment):
            return NotImplemented
        return json.dumps(self.to_dict()) == json.dumps(other.to_dict())

    __hash__ = None  # type: ignore[assignment]


def identity_alignment(z_values: Sequence[int], shape_yx: tuple[int, int]) -> Alignment:
    """Alignment that leaves every slice where it is (frame = slice shape)."""
    eye = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return Alignment(
        {int(z): eye.copy() for z in z_values}, (int(shape_yx[0]), int(shape_yx[1])), "identity"
    )


def _nearest_rotation(lin: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(lin)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def _components(nodes: Sequence[int], links: Sequence[PairResult]) -> list[list[int]]:
    """Connected components of slices over links, each sorted, ordered by first slice."""
    adj: dict[int, set[int]] = {z: set() for z in nodes}
    for p in links:
        adj[p.z_a].add(p.z_b)
        adj[p.z_b].add(p.z_a)
    seen: set[int] = set()
    out = []
    for start in sorted(nodes):
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            for n in adj[todo.pop()]:
                if n not in comp:
                    comp.add(n)
                    todo.append(n)
        seen |= comp
        out.append(sorted(comp))
    return out


def _solve_chain(ref: int, good: list[int], links: Sequence[PairResult]) -> dict[int, np.ndarray]:
    by_b: dict[int, list[PairResult]] = {}
    for p in links:
        if p.z_a < p.z_b:
            by_b.setdefault(p.z_b, []).append(p)
    out = {ref: np.eye(3)}
    for z in good:
        if z == ref:
            continue
        cands = sorted((p for p in by_b.get(z, []) if p.z_a in out), key=lambda p: -p.z_a)
        if cands:
            out[z] = out[cands[0].z_a] @ homogeneous(cands[0].matrix_array)
    return {z: m[:2] for z, m in out.items()}


def _support_points(p: PairResult, shape_yx: tuple[int, int]) -> np.ndarray:
    """Three homogeneous points (3, 3) in slice b whose second moments equal the link's
    support (its matches' mean and covariance), each carrying weight 4/3 (one (z, z+1)
    link = 4 corner points, whatever its match count); the 4 corners when unknown."""
    if p.support is None or not p.support[0] > 0:
        q = corner_points_xy(shape_yx)
        return np.hstack([q, np.ones((4, 1))])
    _, mx, my, cxx, cxy, cyy = p.support
    second = np.array(
        [[cxx + mx * mx, cxy + mx * my, mx], [cxy + mx * my, cyy + my * my, my], [mx, my, 1.0]]
    )
    # Cholesky of 4 x the normalised moment matrix: columns c_j with sum c_j c_j^T = 4 S
    chol = np.linalg.cholesky(4.0 * second + 1e-9 * np.eye(3))
    return chol.T


def _link_error_px(p: PairResult, t: Mapping[int, np.ndarray], shape_yx: tuple[int, int]) -> float:
    """RMS (px) of ``T_a M q - T_b q`` over slice b's 4 corners ``q``."""
    q = corner_points_xy(shape_yx)
    e = apply_affine(t[p.z_a], apply_affine(p.matrix_array, q)) - apply_affine(t[p.z_b], q)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1))))


def _support_error_px(
    p: PairResult, t: Mapping[int, np.ndarray], shape_yx: tuple[int, int]
) -> float:
    """RMS (px, global frame) of ``T_a M p - T_b p`` where the link's matches lie."""
    pts = _support_points(p, shape_yx)
    e = (homogeneous(t[p.z_a]) @ homogeneous(p.matrix_array) - homogeneous(t[p.z_b])) @ pts.T
    return float(np.sqrt(np.sum(e[:2] ** 2) / np.sum(pts[:, 2] ** 2)))  # the points weigh 4


def _gaps(good: list[int], links: Sequence[PairResult]) -> list[tuple[int, int]]:
    """``(z_prev, z_next)`` of consecutive usable slices that no (z, z+1) link joins."""
    direct = {(p.z_a, p.z_b) for p in links if p.distance == 1}
    return [(a, b) for a, b in itertools.pairwise(good) if b - a > 1 or (a, b) not in direct]


def _crossing(links: Sequence[PairResult], gap: tuple[int, int]) -> list[PairResult]:
    return [p for p in links if p.z_a <= gap[0] and p.z_b >= gap[1]]


def _primary(links: Sequence[PairResult], gaps: Sequence[tuple[int, int]]) -> list[bool]:
    """Which links carry full weight: (z, z+1) links, and across each gap the shortest of
    the links that cross it (the bridge; longer crossing links only check it)."""
    shortest = {}
    for gap in gaps:
        d = [p.distance for p in _crossing(links, gap)]
        if d:
            shortest[gap] = min(d)
    return [
        p.distance == 1
        or any(p.z_a <= a and p.z_b >= b and p.distance == shortest[(a, b)] for (a, b) in shortest)
        for p in links
    ]


def _link_weights(
    links: Sequence[PairResult],
    gaps: Sequence[tuple[int, int]],
    shape_yx: tuple[int, int],
    second_weight: float = SECOND_NEIGHBOUR_WEIGHT,
) -> list[float]:
    """Inverse-variance weights ``(REFERENCE_SCATTER r / scatter)²``, times ``second_weight``
    for links that are not primary (:func:`_primary`)."""
    r = max(float(np.hypot(shape_yx[0] - 1, shape_yx[1] - 1)) / 2.0, 1.0)
    out = []
    for p, primary in zip(links, _primary(links, gaps), strict=True):
        sigma = p.scatter_px
        if sigma is None and np.isfinite(p.residual_px):
            sigma = p.residual_px / np.sqrt(2.0)
        if sigma is not None and p.method == "sift" and p.inliers > SIFT_TRUST_INLIERS:
            # a SIFT fit that stood alone: its slices share fine detail and its error is
            # keypoint noise, which averages over its matches (area fits on real sections are
            # limited by content change, which does not)
            sigma *= np.sqrt(SIFT_TRUST_INLIERS / p.inliers)
        w = 1.0 if sigma is None else (REFERENCE_SCATTER * r / max(sigma, MIN_SCATTER_PX)) ** 2
        out.append(w * (1.0 if primary else second_weight))
    return out


def _solve_global(
    ref: int,
    good: list[int],
    links: Sequence[PairResult],
    shape_yx: tuple[int, int],
    regularisation: float,
    weights: Sequence[float],
) -> dict[int, np.ndarray]:
    """Least squares for the slices ``good`` (one connected part), 3x3 each.

    Unknowns per slice: ``(r L_00, r L_01, T(c)_x, r L_10, r L_11, T(c)_y)`` with ``c`` the
    slice centre and ``r`` its half-diagonal (all columns O(r)). With ``regularisation == 0``
    the reference slice is anchored to the identity; otherwise only its centre is anchored
    and the regulariser (module docstring) fixes the rest, iterated with refreshed rotation
    targets (started from the chain).
    """
    h, w = shape_yx
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    r = max(float(np.hypot(w - 1, h - 1)) / 2.0, 1.0)
    col = {z: 6 * i for i, z in enumerate(good)}
    n = 6 * len(good)
    lam = max(float(regularisation), 0.0)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs: list[float] = []

    def add(entries: list[tuple[int, float]], b: float) -> None:
        row = len(rhs)
        for j, v in entries:
            rows.append(row)
            cols.append(j)
            vals.append(v)
        rhs.append(b)

    def basis(hv: np.ndarray) -> np.ndarray:  # homogeneous (x, y, w) -> solver columns
        return np.array([(hv[0] - c[0] * hv[2]) / r, (hv[1] - c[1] * hv[2]) / r, hv[2]])

    for p, wl in zip(links, weights, strict=True):
        sw = np.sqrt(wl)
        m = homogeneous(p.matrix_array)
        ja, jb = col[p.z_a], col[p.z_b]
        for q in _support_points(p, shape_yx):
            ua, ub = basis(m @ q) * sw, basis(q) * sw
            for o in (0, 3):
                add(
                    [(ja + o + i, ua[i]) for i in range(3)]
                    + [(jb + o + i, -ub[i]) for i in range(3)],
                    0.0,
                )
    a0 = ANCHOR_WEIGHT
    j0 = col[ref]
    add([(j0 + 2, a0)], a0 * c[0])
    add([(j0 + 5, a0)], a0 * c[1])
    if lam == 0:
        for j, v in ((0, r), (1, 0.0), (3, 0.0), (4, r)):
            add([(j0 + j, a0)], a0 * v)
    fixed = (list(rows), list(cols), list(vals), list(rhs))
    corners = (corner_points_xy(shape_yx) - c) / r
    chain = _solve_chain(ref, good, links)
    rot = {z: _nearest_rotation(chain[z][:, :2]) if z in chain else np.eye(2) for z in good}
    k = REGULARISATION_WINDOW
    pos = {z: i for i, z in enumerate(good)}
    sol = np.zeros(n)
    for _ in range(ITERATIONS if lam > 0 else 1):
        rows[:], cols[:], vals[:], rhs[:] = (list(v) for v in fixed)
        if lam > 0:
            ls, ms = np.sqrt(lam), np.sqrt(lam * SCALE_WEIGHT) * 2.0 * r
            for z in good:
                win = good[max(0, pos[z] - k) : pos[z] + k + 1]
                f = ls / len(win)
                target = sum(rot[g] for g in win) / len(win)
                for d in corners:
                    tx, ty = ls * r * (target @ d)
                    add(
                        [(col[g], f * d[0]) for g in win] + [(col[g] + 1, f * d[1]) for g in win],
                        tx,
                    )
                    add(
                        [(col[g] + 3, f * d[0]) for g in win]
                        + [(col[g] + 4, f * d[1]) for g in win],
                        ty,
                    )
                # isotropic scale tr(R^T L) / 2 of the window's mean toward 1 (px at 2 r)
                g2 = ms / len(win) / r / 2.0
                add(
                    [
                        (col[g] + o, g2 * rot[g][i, jj])
                        for g in win
                        for o, (i, jj) in zip(
                            (0, 1, 3, 4), ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True
                        )
                    ],
                    ms,
                )
        # SciPy only here: importing it costs ~0.3 CPU-s in every process that imports emflow.align
        import scipy.sparse as sp
        import scipy.sparse.linalg as spla

        a = sp.csr_matrix((vals, (rows, cols)), shape=(len(rhs), n))
        at = a.T.tocsr()
        sol = spla.splu((at @ a).tocsc()).solve(at @ np.asarray(rhs))
        for z in good:
            j = col[z]
            rot[z] = _nearest_rotation(np.array([sol[j : j + 2], sol[j + 3 : j + 5]]) / r)
    out = {}
    for z in good:
        j = col[z]
        lin = np.array([sol[j : j + 2], sol[j + 3 : j + 5]]) / r
        t = np.array([sol[j + 2], sol[j + 5]]) - lin @ c
        out[z] = np.vstack([np.hstack([lin, t[:, None]]), [0.0, 0.0, 1.0]])
    return out


def _interpolate(z: int, placed: Mapping[int, np.ndarray]) -> np.ndarray:
    before = [g for g in placed if g < z]
    after = [g for g in placed if g > z]
    if before and after:
        a, b = max(before), min(after)
        f = (z - a) / (b - a)
        return (1 - f) * placed[a] + f * placed[b]
    return placed[max(before)] if before else placed[min(after)]


def _mean_rotation_removed(placed: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The transforms turned about the origin so the slices' mean rotation angle is zero."""
    angles = []
    for m in placed.values():
        rot = _nearest_rotation(np.asarray(m, np.float64)[:2, :2])
        angles.append(np.arctan2(rot[1, 0], rot[0, 0]))
    th = -float(np.mean(angles))
    g = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    return {z: (g @ homogeneous(m))[:2] for z, m in placed.items()}


def solve(
    pairs: Sequence[PairResult],
    z_values: Sequence[int],
    shape_yx: tuple[int, int],
    *,
    method: str = "global",
    bad_slices: Mapping[int, str] | None = None,
    bad_slice_policy: str = "bridge",
    regularisation: float = DEFAULT_REGULARISATION,
    outlier_px: float = 2.0,
    allow_segments: bool = False,
    detrend: str = DEFAULT_DETREND,
    footprints: Mapping[int, tuple[float, float, float] | None] | None = None,
    frame: str = DEFAULT_FRAME,
    hulls: Mapping[int, Any] | None = None,
) -> Alignment:
    """Per-slice source->global 2x3 transforms (full-res (x, y) px) from pairwise matches.

    Parameters
    ----------
    pairs : sequence of PairResult
        Usually all (z, z+1) and (z, z+2) results plus bridges; failed ones are reported,
        not used.
    z_values : sequence of int
        All slice indices of the stack.
    shape_yx : tuple of int
        Full-resolution slice shape (all slices share it).
    method : str
        ``"global"`` (default, see module docstring) or ``"chain"``.
    bad_slices : mapping of int to str, optional
        Slices known to be unusable (z -> reason), e.g. from ``assess_slice``.
    bad_slice_policy : str
        ``"bridge"``, ``"fill_previous"``, ``"zero"`` or ``"error"`` (raise AlignmentError).
    regularisation : float
        Global only: drift control λ, relative to one (z, z+1) link (module docstring).
    outlier_px : float
        Global only: links whose RMS disagreement exceeds ``max(outlier_px, 3.5 x the median
        of their kind)`` are rejected (worst first).
    allow_segments : bool
        Place the parts of a stack that no checked link joins by the best estimate across
        the gap instead of raising AlignmentError (module docstring).
    detrend : str
        Global only: ``"rigid"`` (default) removes the low-order trend of rotation and
        position over z (:func:`emflow.align.trend.detrend`), ``"none"`` keeps it (the
        output is then only turned so that the mean rotation is zero).
    footprints : mapping of int to (x, y, angle), optional
        Each slice's footprint pose (:func:`emflow.align.trend.footprint_pose`): where the
        trend is measured and the ``"slice"`` frame centred; the whole image when missing.
    frame : str
        ``"slice"`` (default): the output frame has the slice size, centred on the aligned
        stack's mean content position (tissue moved past its edge is cropped and reported in
        ``Alignment.cropped``); ``"union"``: the bounding box of every rendered slice
        (:mod:`emflow.align.frame`).
    hulls : mapping of int to (n, 2) array, optional
        Each slice's footprint hull (:func:`emflow.align.frame.footprint_hull`): the content
        the union frame covers and the cropped fractions count; the slice's corners when
        missing or None.

    Returns
    -------
    Alignment
    """
    if method not in METHODS:
        raise AlignmentError(f"align.method must be one of {METHODS}, not {method!r}")
    if bad_slice_policy not in BAD_SLICE_POLICIES:
        raise AlignmentError(
            f"align.bad_slices must be one of {BAD_SLICE_POLICIES}, not {bad_slice_policy!r}"
        )
    if frame not in FRAMES:
        raise AlignmentError(f"align.frame must be one of {FRAMES}, not {frame!r}")
    if detrend not in DETREND:
        raise AlignmentError(f"align.detrend must be one of {DETREND}, not {detrend!r}")
    if not regularisation >= 0:
        raise AlignmentError(f"align.regularisation must be >= 0, not {regularisation!r}")
    zs = sorted({int(z) for z in z_values})
    if not zs:
        raise AlignmentError("no slices to align: z_values is empty; check the source pattern")
    zset = set(zs)
    bad = {int(z): str(v) for z, v in (bad_slices or {}).items() if int(z) in zset}
    rejected: list[tuple[int, int, str]] = []
    pairs = list(pairs)
    links = []
    for p in pairs:
        if p.z_a not in zset or p.z_b not in zset:
            continue
        if not p.ok:
            rejected.append((p.z_a, p.z_b, p.reason))
        elif p.z_a in bad or p.z_b in bad:
            zb = p.z_a if p.z_a in bad else p.z_b
            rejected.append((p.z_a, p.z_b, f"slice {zb} is bad ({bad[zb]})"))
        else:
            links.append(p)
    # second signal: a slice every one of whose (>= 1) pairs failed
    tried: dict[int, int] = {}
    for p in pairs:
        for z in (p.z_a, p.z_b):
            tried[z] = tried.get(z, 0) + 1
    linked = {z for p in links for z in (p.z_a, p.z_b)}
    for z in zs:
        if z not in bad and tried.get(z, 0) > 0 and z not in linked and len(zs) > 1:
            bad[z] = "no successful match with any neighbour"
    if bad and bad_slice_policy == "error":
        listing = "; ".join(f"z={z}: {r}" for z, r in sorted(bad.items()))
        raise AlignmentError(
            f"bad slices found ({listing}); remove them from the source or set "
            f"align.bad_slices to bridge, fill_previous or zero"
        )
    good = [z for z in zs if z not in bad]
    if not good:
        raise AlignmentError(
            f"no slice could be aligned ({len(bad)} bad slices, e.g. "
            f"z={min(bad)}: {bad[min(bad)]}); check the input, and if the slices are already "
            "aligned set 'align: false' in the recipe"
        )
    if method == "chain":
        placed, gaps, breaks = _place_chain(good, links, bad, pairs, allow_segments)
    else:
        placed, gaps, breaks = _place_global(
            good, bad, links, rejected, pairs, shape_yx, regularisation, outlier_px, allow_segments
        )
    if method == "global" and detrend == "rigid":
        placed = {z: m[:2] for z, m in _detrend(placed, shape_yx, footprints=footprints).items()}
    elif method == "global":
        placed = _mean_rotation_removed(placed)
    transforms = dict(placed)
    for z in zs:
        if z in bad:
            if bad_slice_policy == "fill_previous":
                transforms[z] = placed[_previous_good(z, placed)]
            else:
                transforms[z] = _interpolate(z, placed)
    rendered = [z for z in zs if not (z in bad and bad_slice_policy == "zero")]
    lo, frame_shape = frame_box(transforms, rendered, shape_yx, frame, footprints, hulls)
    shifted = {}
    for z in zs:
        m = np.array(transforms[z], dtype=np.float64)
        m[:, 2] -= lo
        shifted[z] = m
    return Alignment(
        transforms=shifted,
        frame_shape_yx=frame_shape,
        method=method,
        bad_slices=dict(sorted(bad.items())),
        rejected_pairs=rejected,
        pairs=pairs,
        bad_slice_policy=bad_slice_policy if bad_slice_policy != "error" else "bridge",
        segment_breaks=breaks,
        gaps=gaps,
        regularisation=float(regularisation) if method == "global" else 0.0,
        detrend=detrend if method == "global" else "none",
        frame=frame,
        cropped=cropped_fractions(shifted, rendered, shape_yx, frame_shape, hulls),
    )


def _describe_gap(gap: tuple[int, int], bad: Mapping[int, str]) -> str:
    a, b = gap
    inside = [f"z{z} {bad[z]}" for z in range(a + 1, b) if z in bad]
    what = f" ({'; '.join(inside)})" if inside else ""
    return f"z{a}|z{b}{what}"


def _gap_error(
    gap: tuple[int, int], status: str, crossing: Sequence[PairResult], bad: Mapping[int, str]
) -> AlignmentError:
    where = _describe_gap(gap, bad)
    if status == "unchecked":
        p = crossing[0]
        why = (
            f"only one link crosses it (z{p.z_a}→z{p.z_b}) and nothing confirms it "
            f"(at least {BRIDGE_MIN_LINKS} agreeing links are needed)"
        )
    else:
        why = "no link crosses it"
    return AlignmentError(
        f"the stack splits at {where}: {why}. Check those slices in qc/pairs.png; remove "
        "or replace unusable slices, or set align.allow_segments: true to place the parts "
        "by their best (unchecked) estimate"
    )


def _self_evident(p: PairResult) -> bool:
    """A link that confirms itself: a SIFT fit that stood without area refinement (hundreds
    of keypoints agreeing to about a working px, ``match.SIFT_TRUST_PX``), or an area fit whose
    patches agree to half a px. That does not happen by accident; links across 90+ nm of real
    tissue scatter by px and need a second crossing link."""
    if not p.ok or p.inliers < SIFT_TRUST_INLIERS:
        return False
    limit = SIFT_TRUST_PX if p.method == "sift" else 0.5
    return p.residual_px <= limit * p.downsample


def _best_estimate(
    pairs: Sequence[PairResult], left: set[int], right: set[int]
) -> PairResult | None:
    """The crossing pair with the most inliers whose fit produced an estimate (ok or not)."""
    cands = [
        p for p in pairs if p.z_a in left and p.z_b in right and p.inliers >= 3 and p.matches > 0
    ]
    return max(cands, key=lambda p: (p.ok, p.inliers), default=None)


def _solve_parts(
    good: list[int],
    links: Sequence[PairResult],
    shape_yx: tuple[int, int],
    regularisation: float,
    second_weight: float,
) -> dict[int, np.ndarray]:
    """:func:`_solve_global` on each connected part of the stack (3x3 transforms)."""
    weights = _link_weights(links, _gaps(good, links), shape_yx, second_weight)
    placed: dict[int, np.ndarray] = {}
    for comp in _components(good, links):
        cset = set(comp)
        idx = [i for i, p in enumerate(links) if p.z_a in cset]
        placed.update(
            _solve_global(
                comp[0],
                comp,
                [links[i] for i in idx],
                shape_yx,
                regularisation,
                [weights[i] for i in idx],
            )
        )
    return placed


def _place_global(
    good: list[int],
    bad: Mapping[int, str],
    links: list[PairResult],
    rejected: list[tuple[int, int, str]],
    pairs: Sequence[PairResult],
    shape_yx: tuple[int, int],
    regularisation: float,
    outlier_px: float,
    allow_segments: bool,
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]], list[tuple[int, int]]]:
    """Solve, reject inconsistent links, check every gap; returns placed, gaps, breaks.

    A (z, z+1) link that two or more outlying longer links span is taken for the culprit
    (a wrong neighbour link pulls the solution and makes the longer links around it look
    wrong); otherwise the worst outliers are rejected.
    """
    while True:
        placed = _solve_parts(good, links, shape_yx, regularisation, SECOND_NEIGHBOUR_WEIGHT)
        errs = np.array([_support_error_px(p, placed, shape_yx) for p in links])
        worst = _worst_outliers(links, errs, outlier_px, _primary(links, _gaps(good, links)))
        if not worst:
            break
        for i in sorted(worst, reverse=True):
            p = links.pop(i)
            rejected.append((p.z_a, p.z_b, f"inconsistent with other links ({errs[i]:.2f} px RMS)"))
    # every gap must be crossed by BRIDGE_MIN_LINKS links that survived the consistency check
    gap_info: list[dict[str, Any]] = []
    breaks: list[tuple[int, int]] = []
    comp_of = {z: i for i, comp in enumerate(_components(good, links)) for z in comp}
    for gap in _gaps(good, links):
        crossing = _crossing(links, gap)
        confirmed = len(crossing) >= BRIDGE_MIN_LINKS or any(_self_evident(p) for p in crossing)
        status = "bridged" if confirmed else "unchecked" if crossing else "unbridged"
        info = {
            "after": gap[0],
            "before": gap[1],
            "links": [[p.z_a, p.z_b] for p in crossing],
            "status": status,
            "placed_by": "",
        }
        gap_info.append(info)
        if status == "bridged":
            continue
        if not allow_segments:
            raise _gap_error(gap, status, crossing, bad)
        ca, cb = comp_of[gap[0]], comp_of[gap[1]]
        if ca == cb:  # unchecked, but the link joined the parts: already placed by it
            info["placed_by"] = f"unchecked link z{crossing[0].z_a}→z{crossing[0].z_b}"
            breaks.append(gap)
            continue
        left = {z for z, i in comp_of.items() if i == ca}
        right = {z for z, i in comp_of.items() if i == cb}
        est = _best_estimate(pairs, left, right)
        if est is None:
            raise AlignmentError(
                f"the stack splits at z{gap[0]}|z{gap[1]} and no pair across it produced any "
                "estimate, so nothing can place the slices after it; remove the unusable "
                "slices or align the parts as separate runs"
            )
        # T_b = T_a M for the estimate; shift the whole right part accordingly
        fix = placed[est.z_a] @ homogeneous(est.matrix_array) @ np.linalg.inv(placed[est.z_b])
        for z in right:
            placed[z] = fix @ placed[z]
        comp_of.update({z: ca for z in right})
        info["placed_by"] = f"{'unchecked' if est.ok else 'failed'} pair z{est.z_a}→z{est.z_b}"
        breaks.append(gap)
    return {z: m[:2] for z, m in placed.items()}, gap_info, breaks


#: A link this many times over its outlier limit is a false match, rejected on its own.
GROSS_OUTLIER = 10.0


def _worst_outliers(
    links: Sequence[PairResult], errs: np.ndarray, outlier_px: float, primary: Sequence[bool]
) -> list[int]:
    """Indices of links to reject this round (see :func:`_place_global`).

    Outliers are above ``max(outlier_px, 3.5 x the median of their kind)`` ((z, z+1) links
    vs longer ones). A primary link (:func:`_primary`) that two or more outlying longer links
    of like error (within 3x) span is the culprit instead of them: a wrong full-weight link
    pulls the solution and makes the links that check it look wrong. Gross outliers
    (``GROSS_OUTLIER`` x the limit) are rejected first, on their own. At most one link is
    rejected per neighbourhood of 2 slices per round.
    """
    if not len(links):
        return []
    limit = np.zeros(len(links))
    for short in (True, False):
        sel = np.array([(p.distance == 1) == short for p in links])
        if sel.any():
            limit[sel] = max(float(outlier_px), 3.5 * float(np.median(errs[sel])))
    over = [int(i) for i in np.argsort(-errs) if errs[i] > limit[i]]

    def spans(j: int, i: int) -> bool:
        return links[j].distance > links[i].distance and (
            links[j].z_a <= links[i].z_a and links[j].z_b >= links[i].z_b
        )

    def blame_of(i: int) -> int:  # spanning outliers of like size (one gross error is itself)
        e = [errs[j] for j in over if spans(j, i)]
        return sum(1 for v in e if v >= max(e) / 3.0) if e else 0

    # a gross error (10x its limit: a false match) is the link's own: such links go first,
    # before any link they span is blamed (they would blame good links one after another)
    gross = [i for i in over if errs[i] > GROSS_OUTLIER * limit[i]]
    if gross:
        over, blame = gross, {}
    else:
        blame = {i: blame_of(i) for i in range(len(links)) if primary[i]}
    culprits = sorted((i for i, n in blame.items() if n >= 2), key=lambda i: (-blame[i], -errs[i]))
    chosen: list[int] = []
    for i in [*culprits, *over]:
        if i not in culprits and any(spans(i, c) for c in culprits):
            continue  # exonerated: the link it checks goes instead
        p = links[i]
        if all(p.z_b + 2 < links[j].z_a or links[j].z_b + 2 < p.z_a for j in chosen):
            chosen.append(i)
    return chosen


def _place_chain(
    good: list[int],
    links: list[PairResult],
    bad: dict[int, str],
    pairs: Sequence[PairResult],
    allow_segments: bool,
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]], list[tuple[int, int]]]:
    placed = _solve_chain(good[0], good, links)
    for z in good:
        if z not in placed:
            bad[z] = "no successful match to an earlier slice (chain)"
    usable = [z for z in good if z in placed]
    if len(usable) < len(good) and not allow_segments:
        first = min(z for z in good if z not in placed)
        prev = max(z for z in usable if z < first)
        raise AlignmentError(
            f"the stack splits at {_describe_gap((prev, first), bad)}: no successful link "
            "reaches it from an earlier slice (chain). Check those slices in qc/pairs.png, or "
            "set align.allow_segments: true to drop the unreachable slices"
        )
    return placed, [], []


def _previous_good(z: int, placed: Mapping[int, np.ndarray]) -> int:
    before = [g for g in placed if g < z]
    return max(before) if before else min(placed)
