"""Known random affines applied to real aligned EM stacks: synthetic alignment truth.

Truth convention. A real, already aligned stack ``S`` is taken as the global frame.
Each slice ``z`` is distorted by a known 2x3 matrix ``D_z`` (full-res ``(x, y)`` px,
aligned frame -> distorted slice): ``W_z(D_z p) = S_z(p)``. The source->global transform
that undoes it, the quantity :class:`emflow.align.solve.Alignment` estimates, is therefore
``truth_z = D_z^-1``. An alignment is only defined up to one global transform, fixed by its
reference slice, so estimates are compared after expressing both relative to slice ``ref``:
``T_ref^-1 T_z`` against ``truth_ref^-1 truth_z`` (both map slice z into slice ref's px),
see :func:`stack_errors_px`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from emflow.align.warp import invert_affine, warp_slice

__all__ = [
    "apply_to_stack",
    "compose",
    "corner_error_px",
    "insert_bad_slices",
    "pair_truth",
    "random_affines",
    "robustness_px",
    "scale_change",
    "stack_errors_px",
    "warp_stack",
]


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 matrix of ``a o b`` (apply b first), (x, y) px."""
    a3 = np.vstack([np.asarray(a, np.float64).reshape(2, 3), [0, 0, 1]])
    b3 = np.vstack([np.asarray(b, np.float64).reshape(2, 3), [0, 0, 1]])
    return (a3 @ b3)[:2]


def random_affines(
    n: int,
    *,
    max_translation_px: float = 100,
    max_rotation_deg: float = 2,
    max_scale_shear: float = 0.01,
    seed: int = 0,
    shape_yx: tuple[int, int] | None = None,
) -> list[np.ndarray]:
    """``n`` seeded random 2x3 distortions (aligned -> distorted slice, full-res (x, y) px).

    Each is ``t + R(theta) (I + E)`` acting about the slice centre (about (0, 0) when
    ``shape_yx`` is None): the centre moves by a translation of uniformly random direction
    and length ``<= max_translation_px``; ``theta`` is uniform in ``+-max_rotation_deg``;
    ``E`` is symmetric with eigenvalues uniform in ``+-max_scale_shear`` along a random
    axis (1 % means each principal stretch is within 1 %).
    """
    rng = np.random.default_rng(seed)
    cx, cy = (0.0, 0.0) if shape_yx is None else ((shape_yx[1] - 1) / 2, (shape_yx[0] - 1) / 2)
    out = []
    for _ in range(int(n)):
        th = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        phi = rng.uniform(0, np.pi)
        q = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
        e = rng.uniform(-max_scale_shear, max_scale_shear, size=2)
        lin = rot @ (np.eye(2) + q @ np.diag(e) @ q.T)
        ang = rng.uniform(0, 2 * np.pi)
        r = max_translation_px * np.sqrt(rng.uniform(0, 1))
        t = np.array([r * np.cos(ang), r * np.sin(ang)])
        c = np.array([cx, cy])
        out.append(np.hstack([lin, (c + t - lin @ c)[:, None]]))
    return out


def apply_to_stack(
    stack_zyx: np.ndarray, transforms: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distort each (y, x) slice by its matrix ``D_z``; return the stack and truth ``D_z^-1``.

    Parameters
    ----------
    stack_zyx : numpy.ndarray
        Aligned ``(z, y, x)`` stack (the global frame).
    transforms : sequence of numpy.ndarray
        One 2x3 ``D_z`` per slice, aligned -> distorted, full-res (x, y) px.

    Returns
    -------
    warped : numpy.ndarray
        ``(z, y, x)`` same shape and dtype; content pushed out is lost, fill is exactly 0.
    truth : list of numpy.ndarray
        ``D_z^-1``: source (distorted slice) -> global, the convention of
        ``Alignment.transforms`` (module docstring).
    """
    if len(transforms) != stack_zyx.shape[0]:
        raise ValueError(f"{len(transforms)} transforms for {stack_zyx.shape[0]} slices")
    shape = stack_zyx.shape[1:]
    warped = np.stack(
        [warp_slice(s, d, (0, 0), shape) for s, d in zip(stack_zyx, transforms, strict=True)]
    )
    return warped, [invert_affine(d) for d in transforms]


def insert_bad_slices(
    stack_zyx: np.ndarray, bad: Mapping[int, str], *, seed: int = 0
) -> np.ndarray:
    """Copy of a (z, y, x) stack with slices replaced: "blank" (all 0) or "noise" (white noise).

    The noise has the mean and standard deviation of the stack's non-zero pixels, clipped to
    ``1 .. dtype max`` (no exact 0, so it is not mistaken for fill). Slice indices and count
    are unchanged, so truth arrays stay valid for the other slices.
    """
    out = stack_zyx.copy()
    rng = np.random.default_rng(seed)
    nz = stack_zyx[stack_zyx > 0]
    mean, std = (float(nz.mean()), float(nz.std())) if nz.size else (100.0, 30.0)
    top = np.iinfo(out.dtype).max if np.issubdtype(out.dtype, np.integer) else 1.0
    for z, kind in bad.items():
        if kind == "blank":
            out[z] = 0
        elif kind == "noise":
            noise = rng.normal(mean, max(std, 1.0), size=out.shape[1:])
            out[z] = np.clip(np.rint(noise), 1, top).astype(out.dtype)
        else:
            raise ValueError(f"bad slice kind for z={z} must be 'blank' or 'noise', not {kind!r}")
    return out


def corner_error_px(m_est: np.ndarray, m_true: np.ndarray, shape_yx: tuple[int, int]) -> float:
    """Largest displacement (px) between two 2x3 transforms over the 4 corner pixel centres."""
    h, w = shape_yx
    c = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=np.float64)
    a = c @ np.asarray(m_est, np.float64).reshape(2, 3).T
    b = c @ np.asarray(m_true, np.float64).reshape(2, 3).T
    return float(np.max(np.linalg.norm(a - b, axis=1)))


def pair_truth(truth: Sequence[np.ndarray], z_a: int, z_b: int) -> np.ndarray:
    """True pair matrix (b -> a, the ``PairResult.matrix`` convention): ``truth_a^-1 truth_b``."""
    return compose(invert_affine(truth[z_a]), truth[z_b])


def stack_errors_px(
    estimated: Mapping[int, np.ndarray],
    truth: Sequence[np.ndarray],
    shape_yx: tuple[int, int],
    *,
    ref: int | None = None,
) -> dict[int, float]:
    """Per-slice corner error (px in slice ``ref``) of source->global transforms vs truth.

    Compares ``T_ref^-1 T_z`` with ``truth_ref^-1 truth_z`` for every z in ``estimated``;
    ``ref`` defaults to the smallest z.
    """
    zs = sorted(estimated)
    r = zs[0] if ref is None else ref
    inv_e, inv_t = invert_affine(estimated[r]), invert_affine(truth[r])
    return {
        z: corner_error_px(compose(inv_e, estimated[z]), compose(inv_t, truth[z]), shape_yx)
        for z in zs
    }


def warp_stack(
    stack_zyx: np.ndarray,
    *,
    seed: int,
    max_translation_px: float = 100,
    max_rotation_deg: float = 2,
    max_scale_shear: float = 0.01,
    keep_content: bool = True,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Misplace every slice of a (z, y, x) stack by its own seeded random affine.

    The draws are those of :func:`random_affines` about each slice's centre. With
    ``keep_content`` (default) every slice is rendered into a canvas padded on all sides by
    the most any draw can move a corner, so no tissue is lost and the misplaced stack holds
    exactly the same content as the original: what changes is only where each slice sits
    (robustness to the starting misplacement, not to a changing field of view). Otherwise
    the canvas keeps the slice shape and what is pushed out is lost.

    Returns
    -------
    warped : numpy.ndarray
        ``(z, h, w)`` misplaced stack, fill exactly 0.
    warps : list of numpy.ndarray
        Per slice the 2x3 map from original slice px to warped canvas px, (x, y).
    """
    shape = stack_zyx.shape[1:]
    pad = 0
    if keep_content:
        half_diag = float(np.hypot(shape[0] - 1, shape[1] - 1)) / 2.0
        reach = np.sin(np.deg2rad(max_rotation_deg)) + 1.5 * max_scale_shear
        pad = int(np.ceil(max_translation_px + half_diag * reach)) + 2
    warps = random_affines(
        len(stack_zyx),
        max_translation_px=max_translation_px,
        max_rotation_deg=max_rotation_deg,
        max_scale_shear=max_scale_shear,
        seed=seed,
        shape_yx=shape,
    )
    shift = np.array([[0.0, 0.0, pad], [0.0, 0.0, pad]])
    warps = [np.asarray(m, np.float64) + shift for m in warps]
    canvas = (shape[0] + 2 * pad, shape[1] + 2 * pad)
    warped = np.stack(
        [warp_slice(s, m, (0, 0), canvas) for s, m in zip(stack_zyx, warps, strict=True)]
    )
    return warped, warps


def robustness_px(
    reference: Mapping[int, np.ndarray],
    misplaced: Mapping[int, np.ndarray],
    warps: Sequence[np.ndarray],
    shape_yx: tuple[int, int],
    *,
    skip: Sequence[int] = (),
) -> tuple[float, float, dict[int, float]]:
    """How far an alignment of a misplaced stack is from the original's, up to ONE affine.

    ``reference`` holds the source->global transforms ``A_z`` of the original stack,
    ``misplaced`` those ``T_z`` of the stack misplaced by ``warps`` ``D_z`` (original px ->
    misplaced px, :func:`warp_stack`). Both should place the same tissue alike, so
    ``G A_z = T_z D_z`` for one global affine ``G``, fitted by least squares over the 4
    corners of every slice (except ``skip``). Returns the median and largest per-slice
    corner distance (px) after the fit, and the per-slice values.
    """
    h, w = shape_yx
    q = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64)
    zs = [z for z in sorted(reference) if z in misplaced and z not in skip]
    src = np.vstack([q @ _h3(reference[z]).T for z in zs])
    dst = np.vstack([(q @ (_h3(misplaced[z]) @ _h3(warps[z])).T)[:, :2] for z in zs])
    g, *_ = np.linalg.lstsq(src, dst, rcond=None)
    per = {
        z: float(
            np.max(np.linalg.norm(src[4 * i : 4 * i + 4] @ g - dst[4 * i : 4 * i + 4], axis=1))
        )
        for i, z in enumerate(zs)
    }
    vals = np.array(list(per.values()))
    return float(np.median(vals)), float(np.max(vals)), per


def scale_change(transforms: Mapping[int, np.ndarray], z0: int, z1: int) -> float:
    """Isotropic scale of slice ``z1`` relative to slice ``z0`` after alignment, minus 1."""
    rel = np.linalg.inv(_h3(transforms[z0])) @ _h3(transforms[z1])
    return float(np.sqrt(abs(np.linalg.det(rel[:2, :2])))) - 1.0


def _h3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
