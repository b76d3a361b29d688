"""Quality-control outputs of an alignment: per-pair table (CSV) and plots (PNG, Agg).

The table has one row per pair result: the pair, its kind (neighbour / second / bridge),
the matcher, whether the match succeeded and whether the solver used it (``status``
matched / failed / rejected, with the reason), the model, inlier/match counts, inlier RMS
residual, displacement scatter, forward/backward gap and NCC (full-resolution px), the
link's disagreement with the solved transforms (``link_error_px``, RMS over slice ``z_b``'s
corners) and, measured independently on the content after alignment, the patch NCC
residual between the two slices (``content_px``: median local displacement left;
``content_shift_px``: their common part). The content measure is what shows how well
the sections agree: a chain of links always agrees with itself. Plots use matplotlib's
object API with the Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emflow.align.match import PairResult, corner_points_xy
from emflow.align.solve import Alignment, pair_kind

__all__ = ["link_error_px", "plot_pairs", "plot_reslices", "write_pair_table"]

COLUMNS = (
    "z_a",
    "z_b",
    "kind",
    "method",
    "ok",
    "used",
    "status",
    "reason",
    "model",
    "inliers",
    "matches",
    "residual_px",
    "scatter_px",
    "fwd_bwd_px",
    "ncc",
    "corner_gap_px",
    "link_error_px",
    "content_px",
    "content_shift_px",
)

Content = Mapping[tuple[int, int], Mapping[str, Any]]


def link_error_px(
    pair: PairResult, alignment: Alignment | None, shape_yx: tuple[int, int]
) -> float:
    """RMS (px, global frame) of ``T_a M q - T_b q`` over slice ``z_b``'s corners ``q``."""
    if alignment is None:
        return float("nan")
    t = alignment.transforms
    if pair.z_a not in t or pair.z_b not in t:
        return float("nan")
    q = corner_points_xy(shape_yx)
    m = pair.matrix_array
    ta, tb = t[pair.z_a], t[pair.z_b]
    pa = (q @ m[:, :2].T + m[:, 2]) @ ta[:, :2].T + ta[:, 2]
    pb = q @ tb[:, :2].T + tb[:, 2]
    return float(np.sqrt(np.mean(np.sum((pa - pb) ** 2, axis=1))))


def _rows(
    pairs: Sequence[PairResult],
    alignment: Alignment | None,
    shape_yx: tuple[int, int],
    content: Content | None = None,
) -> list[dict]:
    rejected = {} if alignment is None else {(a, b): r for a, b, r in alignment.rejected_pairs}
    content = content or {}
    rows = []
    for p in pairs:
        used = p.ok and alignment is not None and (p.z_a, p.z_b) not in rejected
        if not p.ok:
            status = "failed"
        elif alignment is None:
            status = "not solved"
        else:
            status = "matched" if used else "rejected"
        c = content.get((p.z_a, p.z_b), {})
        rows.append(
            {
                "z_a": p.z_a,
                "z_b": p.z_b,
                "kind": pair_kind(p),
                "method": p.method,
                "ok": p.ok,
                "used": used,
                "status": status,
                "reason": p.reason or rejected.get((p.z_a, p.z_b), ""),
                "model": p.model,
                "inliers": p.inliers,
                "matches": p.matches,
                "residual_px": p.residual_px,
                "scatter_px": _num(p.scatter_px),
                "fwd_bwd_px": _num(p.fwd_bwd_px),
                "ncc": _num(p.ncc),
                "corner_gap_px": p.corner_gap_px,
                "link_error_px": link_error_px(p, alignment, shape_yx) if p.ok else float("nan"),
                "content_px": _num(c.get("median_px")),
                "content_shift_px": _num(c.get("shift_px")),
            }
        )
    return rows


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _shape(alignment: Alignment | None, shape_yx: tuple[int, int] | None) -> tuple[int, int]:
    if shape_yx is not None:
        return shape_yx
    if alignment is None:
        raise ValueError("shape_yx is needed without an alignment")
    return alignment.frame_shape_yx


def write_pair_table(
    pairs: Sequence[PairResult],
    alignment: Alignment | None,
    path_csv: str | Path,
    *,
    shape_yx: tuple[int, int] | None = None,
    content: Content | None = None,
) -> None:
    """Write the per-pair QC table (CSV, one row per pair, columns :data:`COLUMNS`).

    ``shape_yx`` is the slice shape for the link error (default: the frame shape);
    ``alignment`` None (no solve) leaves the solver columns empty; ``content`` maps a pair to
    its after-alignment measurement (``median_px``, ``shift_px``).
    """
    with Path(path_csv).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in _rows(pairs, alignment, _shape(alignment, shape_yx), content):
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def plot_pairs(
    pairs: Sequence[PairResult],
    alignment: Alignment | None,
    path_png: str | Path,
    *,
    shape_yx: tuple[int, int] | None = None,
    content: Content | None = None,
) -> None:
    """Plot, along z and per pair kind: the content residual after alignment (or, before a
    solve, the fit residual), the link error, and inlier counts (PNG).

    Failed or rejected pairs are marked with red crosses; bad slices with grey bands.
    """
    rows = _rows(pairs, alignment, _shape(alignment, shape_yx), content)
    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_r, ax_i = fig.subplots(2, 1, sharex=True)
    for kind in ("neighbour", "second", "bridge"):
        sel = [r for r in rows if r["kind"] == kind and r["ok"]]
        if not sel:
            continue
        z = [r["z_b"] for r in sel]
        if any(np.isfinite(r["content_px"]) for r in sel):
            ax_r.plot(z, [r["content_px"] for r in sel], "o-", ms=3, label=f"content, {kind}")
        else:
            ax_r.plot(z, [r["residual_px"] for r in sel], "o-", ms=3, label=f"fit residual, {kind}")
        if alignment is not None:
            ax_r.plot(z, [r["link_error_px"] for r in sel], ".:", label=f"link error, {kind}")
        ax_i.plot(z, [r["inliers"] for r in sel], "o-", ms=3, label=f"inliers, {kind}")
    bad = [r for r in rows if r["status"] in ("failed", "rejected")]
    if bad:
        ax_i.plot(
            [r["z_b"] for r in bad], [r["inliers"] for r in bad], "rx", label="failed/rejected"
        )
    for z in alignment.bad_slices if alignment is not None else ():
        for ax in (ax_r, ax_i):
            ax.axvspan(z - 0.5, z + 0.5, color="0.85")
    ax_r.set_ylabel("px (full resolution)")
    ax_i.set_ylabel("inliers")
    ax_i.set_xlabel("z (moving slice of the pair)")
    for ax in (ax_r, ax_i):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if alignment is None:
        ax_r.set_title("pair QC (no alignment: the run stopped before the solve)")
    else:
        ax_r.set_title(
            f"pair QC ({alignment.method}; {len(alignment.bad_slices)} bad slices; content = "
            "patch NCC residual after alignment)"
        )
    fig.tight_layout()
    fig.savefig(str(path_png))


def plot_reslices(
    before_zyx: np.ndarray,
    after_zyx: np.ndarray,
    path_png: str | Path,
    voxel_size_nm_xyz: tuple[float, float, float],
) -> None:
    """Orthogonal XZ and YZ reslices through the centre, before vs after alignment (PNG).

    ``before_zyx`` and ``after_zyx`` are ``(z, y, x)`` stacks (shapes may differ); z is
    stretched by ``voxel_z / voxel_x`` (and ``voxel_z / voxel_y``) so that the reslices are
    shown at physical aspect ratio.
    """
    vx, vy, vz = (float(v) for v in voxel_size_nm_xyz)
    fig = Figure(figsize=(12, 6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for col, (name, vol) in enumerate((("before", before_zyx), ("after", after_zyx))):
        vol = np.asarray(vol)
        xz = vol[:, vol.shape[1] // 2, :]
        yz = vol[:, :, vol.shape[2] // 2]
        axes[0, col].imshow(xz, cmap="gray", aspect=vz / vx, interpolation="nearest")
        axes[0, col].set_title(f"{name}: XZ at y={vol.shape[1] // 2}")
        axes[1, col].imshow(yz, cmap="gray", aspect=vz / vy, interpolation="nearest")
        axes[1, col].set_title(f"{name}: YZ at x={vol.shape[2] // 2}")
        axes[0, col].set_ylabel("z")
        axes[1, col].set_ylabel("z")
    fig.tight_layout()
    fig.savefig(str(path_png))
