"""Quality-control outputs of an alignment: per-pair table (CSV) and plots (PNG, Agg).

The table has one row per pair result: the pair, whether the match succeeded, whether the
solver used it, the reason if not, the model, inlier/match counts, inlier RMS residual and
model-vs-affine corner gap (full-resolution px), and the link's disagreement with the
solved transforms (px RMS over slice ``z_b``'s corners). Plots use matplotlib's object API
with the Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emflow.align.match import PairResult, corner_points_xy
from emflow.align.solve import Alignment

__all__ = ["link_error_px", "plot_pairs", "plot_reslices", "write_pair_table"]

COLUMNS = (
    "z_a",
    "z_b",
    "ok",
    "used",
    "reason",
    "model",
    "inliers",
    "matches",
    "residual_px",
    "corner_gap_px",
    "link_error_px",
)


def link_error_px(pair: PairResult, alignment: Alignment, shape_yx: tuple[int, int]) -> float:
    """RMS (px, global frame) of ``T_a M q - T_b q`` over slice ``z_b``'s corners ``q``."""
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
    pairs: Sequence[PairResult], alignment: Alignment, shape_yx: tuple[int, int]
) -> list[dict]:
    rejected = {(a, b): r for a, b, r in alignment.rejected_pairs}
    rows = []
    for p in pairs:
        used = p.ok and (p.z_a, p.z_b) not in rejected
        rows.append(
            {
                "z_a": p.z_a,
                "z_b": p.z_b,
                "ok": p.ok,
                "used": used,
                "reason": p.reason or rejected.get((p.z_a, p.z_b), ""),
                "model": p.model,
                "inliers": p.inliers,
                "matches": p.matches,
                "residual_px": p.residual_px,
                "corner_gap_px": p.corner_gap_px,
                "link_error_px": link_error_px(p, alignment, shape_yx) if p.ok else float("nan"),
            }
        )
    return rows


def _shape(alignment: Alignment, shape_yx: tuple[int, int] | None) -> tuple[int, int]:
    return alignment.frame_shape_yx if shape_yx is None else shape_yx


def write_pair_table(
    pairs: Sequence[PairResult],
    alignment: Alignment,
    path_csv: str | Path,
    *,
    shape_yx: tuple[int, int] | None = None,
) -> None:
    """Write the per-pair QC table (CSV, one row per pair, columns :data:`COLUMNS`).

    ``shape_yx`` is the slice shape for the link error (default: the frame shape).
    """
    with Path(path_csv).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in _rows(pairs, alignment, _shape(alignment, shape_yx)):
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def plot_pairs(
    pairs: Sequence[PairResult],
    alignment: Alignment,
    path_png: str | Path,
    *,
    shape_yx: tuple[int, int] | None = None,
) -> None:
    """Plot inlier RMS residual, link error and inlier count along z (PNG), per neighbour distance.

    Failed or rejected pairs are marked with red crosses; bad slices with grey bands.
    """
    rows = _rows(pairs, alignment, _shape(alignment, shape_yx))
    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_r, ax_i = fig.subplots(2, 1, sharex=True)
    for dist in sorted({r["z_b"] - r["z_a"] for r in rows}):
        sel = [r for r in rows if r["z_b"] - r["z_a"] == dist and r["used"]]
        z = [r["z_b"] for r in sel]
        ax_r.plot(z, [r["residual_px"] for r in sel], "o-", ms=3, label=f"residual, z-{dist}")
        ax_r.plot(z, [r["link_error_px"] for r in sel], ".:", label=f"link error, z-{dist}")
        ax_i.plot(z, [r["inliers"] for r in sel], "o-", ms=3, label=f"inliers, z-{dist}")
    bad = [r for r in rows if not r["used"]]
    if bad:
        ax_i.plot(
            [r["z_b"] for r in bad], [r["inliers"] for r in bad], "rx", label="failed/rejected"
        )
    for z in alignment.bad_slices:
        for ax in (ax_r, ax_i):
            ax.axvspan(z - 0.5, z + 0.5, color="0.85")
    ax_r.set_ylabel("px (full resolution)")
    ax_i.set_ylabel("inliers")
    ax_i.set_xlabel("z (moving slice of the pair)")
    ax_r.legend(fontsize=7)
    ax_i.legend(fontsize=7)
    ax_r.set_title(f"pair QC ({alignment.method}; {len(alignment.bad_slices)} bad slices)")
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
