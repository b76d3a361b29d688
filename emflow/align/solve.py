"""Turn pairwise matches into one source->global 2x3 transform per slice and a global frame.

Core representation: :class:`Alignment` maps each z to a 2x3 float64 matrix in
full-resolution ``(x, y)`` pixel coordinates taking slice z into the global aligned frame
(pixel centres at integers), shifted so that the bounding box of all rendered slices
starts at (0, 0); ``frame_shape_yx`` is that box's size. A pair ``(z_a, z_b)`` with matrix
``M`` (b -> a) states ``T_b = T_a M``.

Methods
-------
``"chain"``
    Reference behaviour: ``T_z = T_a M_(a, z)`` with ``a`` the nearest earlier placed slice
    that has a successful link to z (normally z-1; z-2 bridges a failed z-1).
``"global"``
    Linear least squares over all successful links (1st and 2nd neighbours): each link
    asks that ``T_a(M q) = T_b(q)`` at the 4 corners ``q`` of slice b, weighted by
    ``sqrt(inliers) / residual_px`` (normalised to a median of 1). The first good slice
    is fixed to the identity. An optional term (weight ``regularisation`` relative to one
    link; default 0) pulls every slice's linear part toward its nearest rotation (damps
    scale/shear drift, but biases stacks whose sections carry real independent
    distortions: +0.5 px at 0.01 on the 30-slice test stack). Links that disagree with
    the solution by more than
    ``max(outlier_px, 3.5 x median)`` (RMS over the corners) are rejected one at a time and
    reported. x and y rows decouple, so two sparse solves share one factorisation.

Bad slices (given by the caller, e.g. from :func:`emflow.align.quality.assess_slice`, or
found here because none of their links succeeded) never constrain the solution; the
``bad_slice_policy`` says what is rendered in their place. Slices that no chain of
successful links connects (e.g. after two consecutive bad slices when only 1st and 2nd
neighbours were matched) form separate segments: each is solved on its own and placed
with the identity relative to the last slice before it, and the break is reported in
``Alignment.segment_breaks``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from emflow.align.match import PairResult, corner_points_xy
from emflow.errors import AlignmentError

__all__ = ["BAD_SLICE_POLICIES", "METHODS", "Alignment", "identity_alignment", "solve"]

METHODS = ("global", "chain")
BAD_SLICE_POLICIES = ("bridge", "fill_previous", "zero", "error")
FORMAT = "emflow-alignment"
#: Weight of the rows that anchor the reference slice (gauge), relative to one link.
ANCHOR_WEIGHT = 1000.0
VERSION = 1


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
        ``(z_prev, z_next)`` where no successful link connects the slices up to ``z_prev``
        with those from ``z_next`` on (e.g. two consecutive bad slices with only 1st and
        2nd neighbour links): the later segment is placed with the identity relative to
        ``z_prev``, so expect a jump there. Add longer links or inspect those slices.
    """

    transforms: dict[int, np.ndarray]
    frame_shape_yx: tuple[int, int]
    method: str
    bad_slices: dict[int, str] = field(default_factory=dict)
    rejected_pairs: list[tuple[int, int, str]] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    bad_slice_policy: str = "bridge"
    segment_breaks: list[tuple[int, int]] = field(default_factory=list)

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (floats exact: json writes them with repr)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "frame_shape_yx": [int(v) for v in self.frame_shape_yx],
            "bad_slice_policy": self.bad_slice_policy,
            "transforms": {
                str(z): [[float(v) for v in row] for row in np.asarray(m, np.float64)]
                for z, m in sorted(self.transforms.items())
            },
            "bad_slices": {str(z): r for z, r in sorted(self.bad_slices.items())},
            "rejected_pairs": [[int(a), int(b), str(r)] for a, b, r in self.rejected_pairs],
            "pairs": [p.to_dict() for p in self.pairs],
            "segment_breaks": [[int(a), int(b)] for a, b in self.segment_breaks],
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


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


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
            out[z] = out[cands[0].z_a] @ _h(cands[0].matrix_array)
    return {z: m[:2] for z, m in out.items()}


def _solve_global(
    ref: int,
    good: list[int],
    links: Sequence[PairResult],
    shape_yx: tuple[int, int],
    regularisation: float,
    iterations: int = 5,
) -> dict[int, np.ndarray]:
    """Least squares for all good slices, returned relative to ``ref`` (identity).

    Unknowns per slice and per output row (x, then y separately): ``(r L_row, T(c)_row)``
    with ``c`` the slice centre and ``r`` its half-diagonal, so all columns are O(1). With
    ``regularisation == 0`` the reference slice is anchored to the identity. With
    ``regularisation > 0`` only its centre is anchored and every slice's linear part
    (the reference's too) is pulled toward its nearest rotation: an alignment is then not
    biased toward the reference slice's own distortion, and low-frequency scale/shear
    drift is damped. The result is re-expressed relative to the reference slice.
    """
    h, w = shape_yx
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    r = max(float(np.hypot(w - 1, h - 1)) / 2.0, 1.0)
    q = corner_points_xy(shape_yx)
    qb = np.hstack([(q - c) / r, np.ones((4, 1))])  # basis of slice b at its corners
    col = {z: 3 * i for i, z in enumerate(good)}
    n = 3 * len(good)
    lam = math.sqrt(max(float(regularisation), 0.0))
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs_x: list[float] = []
    rhs_y: list[float] = []

    def add(entries: list[tuple[int, float]], bx: float, by: float) -> None:
        row = len(rhs_x)
        for j, v in entries:
            rows.append(row)
            cols.append(j)
            vals.append(v)
        rhs_x.append(bx)
        rhs_y.append(by)

    for p, wl in zip(links, _link_weights(links), strict=True):
        ua = np.hstack([(_apply(p.matrix_array, q) - c) / r, np.ones((4, 1))]) * wl
        for k in range(4):
            ja, jb = col[p.z_a], col[p.z_b]
            add(
                [(ja + i, ua[k, i]) for i in range(3)]
                + [(jb + i, -wl * qb[k, i]) for i in range(3)],
                0.0,
                0.0,
            )
    anchor = ANCHOR_WEIGHT
    j0 = col[ref]
    add([(j0 + 2, anchor)], anchor * c[0], anchor * c[1])
    if lam == 0:
        add([(j0, anchor)], anchor * r, 0.0)
        add([(j0 + 1, anchor)], 0.0, anchor * r)
    d = (q - c) / r
    n_fixed = len(rhs_x)
    if lam > 0:
        for z in good:
            for k in range(4):
                add([(col[z], lam * d[k, 0]), (col[z] + 1, lam * d[k, 1])], 0.0, 0.0)
    a = sp.csr_matrix((vals, (rows, cols)), shape=(len(rhs_x), n))
    at = a.T.tocsr()
    lu = spla.splu((at @ a).tocsc())
    bx_all, by_all = np.array(rhs_x), np.array(rhs_y)
    chain = _solve_chain(ref, good, links)  # rotation targets start from the chain
    rot = {z: _nearest_rotation(chain[z][:, :2]) if z in chain else np.eye(2) for z in good}
    sol_x = sol_y = np.zeros(n)
    for _ in range(iterations if lam > 0 else 1):
        if lam > 0:
            reg = np.array([lam * (r * rot[z] @ d[k]) for z in good for k in range(4)])
            bx_all[n_fixed:] = reg[:, 0]
            by_all[n_fixed:] = reg[:, 1]
        sol_x = lu.solve(at @ bx_all)
        sol_y = lu.solve(at @ by_all)
        for z in good:
            j = col[z]
            rot[z] = _nearest_rotation(np.array([sol_x[j : j + 2], sol_y[j : j + 2]]) / r)
    out = {}
    for z in good:
        j = col[z]
        lin = np.array([sol_x[j : j + 2], sol_y[j : j + 2]]) / r
        t = np.array([sol_x[j + 2], sol_y[j + 2]]) - lin @ c
        out[z] = np.vstack([np.hstack([lin, t[:, None]]), [0.0, 0.0, 1.0]])
    inv_ref = np.linalg.inv(out[ref])
    return {z: (inv_ref @ m)[:2] for z, m in out.items()}


def _link_weights(links: Sequence[PairResult]) -> np.ndarray:
    """Square-root weights of links: inverse standard error ``sqrt(inliers) / residual``,
    normalised to a median of 1 (so ``regularisation`` stays relative to a typical link)."""
    if not links:
        return np.zeros(0)
    res = np.array([p.residual_px for p in links], dtype=np.float64)
    floor = max(float(np.median(res)) * 0.25, 1e-3)
    w = np.sqrt([p.inliers for p in links]) / np.maximum(res, floor)
    return w / float(np.median(w))


def _link_error_px(p: PairResult, t: Mapping[int, np.ndarray], shape_yx: tuple[int, int]) -> float:
    q = corner_points_xy(shape_yx)
    e = _apply(t[p.z_a], _apply(p.matrix_array, q)) - _apply(t[p.z_b], q)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1))))


def _interpolate(z: int, placed: Mapping[int, np.ndarray]) -> np.ndarray:
    before = [g for g in placed if g < z]
    after = [g for g in placed if g > z]
    if before and after:
        a, b = max(before), min(after)
        f = (z - a) / (b - a)
        return (1 - f) * placed[a] + f * placed[b]
    return placed[max(before)] if before else placed[min(after)]


def solve(
    pairs: Sequence[PairResult],
    z_values: Sequence[int],
    shape_yx: tuple[int, int],
    *,
    method: str = "global",
    bad_slices: Mapping[int, str] | None = None,
    bad_slice_policy: str = "bridge",
    regularisation: float = 0.0,
    outlier_px: float = 2.0,
) -> Alignment:
    """Per-slice source->global 2x3 transforms (full-res (x, y) px) from pairwise matches.

    Parameters
    ----------
    pairs : sequence of PairResult
        Usually all (z, z+1) and (z, z+2) results; failed ones are reported, not used.
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
        Global only: weight, relative to one link, pulling each slice toward rigid.
    outlier_px : float
        Global only: links whose corner RMS disagreement exceeds
        ``max(outlier_px, 3.5 x median)`` are rejected (worst first).

    Returns
    -------
    Alignment
    """
    if method not in METHODS:
        raise AlignmentError(f"align.method must be one of {METHODS}, not {method!r}")
    if bad_slice_policy not in BAD_SLICE_POLICIES:
        raise AlignmentError(
            f"align.bad_slice_policy must be one of {BAD_SLICE_POLICIES}, not {bad_slice_policy!r}"
        )
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

    good = [z for z in zs if z not in bad]
    placed: dict[int, np.ndarray] = {}
    breaks: list[tuple[int, int]] = []
    while good:
        placed, breaks = {}, []
        for comp in _components(good, links):
            cset = set(comp)
            clinks = [p for p in links if p.z_a in cset]
            if method == "chain":
                sol = _solve_chain(comp[0], comp, clinks)
            else:
                sol = _solve_global(comp[0], comp, clinks, shape_yx, regularisation)
            if placed:  # a later segment: nothing links it to the earlier ones
                prev = max(z for z in placed if z < comp[0])
                sol = {z: (_h(placed[prev]) @ _h(m))[:2] for z, m in sol.items()}
                breaks.append((prev, comp[0]))
            placed.update(sol)
        if method == "chain":
            for z in good:
                if z not in placed:
                    bad[z] = "no successful match to an earlier slice (chain)"
            break
        errs = [_link_error_px(p, placed, shape_yx) for p in links]
        if not errs:
            break
        limit = max(float(outlier_px), 3.5 * float(np.median(errs)))
        worst = int(np.argmax(errs))
        if errs[worst] <= limit:
            break
        p = links.pop(worst)
        rejected.append(
            (p.z_a, p.z_b, f"inconsistent with other links ({errs[worst]:.2f} px > {limit:.2f} px)")
        )

    if bad and bad_slice_policy == "error":
        listing = "; ".join(f"z={z}: {r}" for z, r in sorted(bad.items()))
        raise AlignmentError(
            f"bad slices found ({listing}); remove them from the source or set "
            f"align.bad_slice_policy to bridge, fill_previous or zero"
        )
    if not placed:
        raise AlignmentError(
            f"no slice could be aligned ({len(bad)} bad slices, e.g. "
            f"z={min(bad)}: {bad[min(bad)]}); check the input, and if the slices are already "
            "aligned set 'align: false' in the recipe"
        )
    transforms = dict(placed)
    for z in zs:
        if z in bad:
            if bad_slice_policy == "fill_previous":
                transforms[z] = placed[_previous_good(z, placed)]
            else:
                transforms[z] = _interpolate(z, placed)
    rendered = [z for z in zs if not (z in bad and bad_slice_policy == "zero")]
    corners = np.vstack([_apply(transforms[z], corner_points_xy(shape_yx)) for z in rendered])
    # corner pixel centres; 1e-6 px tolerance so that float noise does not add a pixel
    lo = np.floor(corners.min(axis=0) + 1e-6)
    hi = np.ceil(corners.max(axis=0) - lo - 1e-6)
    shifted = {}
    for z in zs:
        m = np.array(transforms[z], dtype=np.float64)
        m[:, 2] -= lo
        shifted[z] = m
    return Alignment(
        transforms=shifted,
        frame_shape_yx=(int(hi[1]) + 1, int(hi[0]) + 1),
        method=method,
        bad_slices=dict(sorted(bad.items())),
        rejected_pairs=rejected,
        pairs=pairs,
        bad_slice_policy=bad_slice_policy if bad_slice_policy != "error" else "bridge",
        segment_breaks=breaks,
    )


def _previous_good(z: int, placed: Mapping[int, np.ndarray]) -> int:
    before = [g for g in placed if g < z]
    return max(before) if before else min(placed)
