"""How emflow's results look in Jupyter (``_repr_html_``) and as a text summary.

:class:`~emflow.discover.SliceCatalog`, :class:`~emflow.plan.Plan`,
:class:`~emflow.align.solve.Alignment` and :class:`~emflow.pipeline.RunResult` delegate their
``_repr_html_`` here: small tables (stages and times, pairs matched / failed / rejected, bad
slices, outputs with links) and the run's QC plots as thumbnails. Pure functions of the
objects and the run folder; nothing here runs work.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: width (px) of the QC thumbnails embedded in a RunResult's HTML
THUMB_WIDTH = 560
#: rejected/failed pairs listed by name before "... and N more"
MAX_LISTED = 8
_STYLE = (
    "<style>.emflow-repr table{border-collapse:collapse;margin:2px 0 8px 0}"
    ".emflow-repr td,.emflow-repr th{padding:1px 8px;text-align:left;vertical-align:top}"
    ".emflow-repr th{border-bottom:1px solid #aaa}.emflow-repr .num{text-align:right}"
    ".emflow-repr .bad{color:#b00}.emflow-repr .dim{color:#777}</style>"
)


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], num: Sequence[int] = ()) -> str:
    left, right = "style='text-align:left'", "style='text-align:right'"
    h = "".join(f"<th {right if i in num else left}>{_e(c)}</th>" for i, c in enumerate(head))
    body = []
    for row in rows:
        cells = "".join(f"<td {right if i in num else left}>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _box(title: str, *parts: str) -> str:
    return f"{_STYLE}<div class='emflow-repr'><b>{title}</b><br>{''.join(parts)}</div>"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _xyz(shape_zyx: Sequence[Any]) -> str:
    z, y, x = shape_zyx
    return f"{x} × {y} × {z}"


def _link(path: Path, label: str | None = None) -> str:
    """A link Jupyter can follow (relative to the kernel's folder) or the plain path."""
    path = Path(path)
    label = _e(label if label is not None else path)
    try:
        rel = os.path.relpath(path.resolve(), Path.cwd())
    except ValueError:
        return f"<code>{label}</code>"
    if rel.startswith(".."):
        return f"<code>{label}</code>"
    return f"<a href='{_e(rel)}' target='_blank'><code>{label}</code></a>"


def thumbnail_html(path: Path, width: int = THUMB_WIDTH) -> str:
    """An ``<img>`` with an embedded, downscaled JPEG copy of a plot (empty if unreadable)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return ""
    if img.shape[1] > width:
        h = max(1, round(img.shape[0] * width / img.shape[1]))
        img = cv2.resize(img, (width, h), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        return ""
    data = base64.b64encode(jpeg.tobytes()).decode("ascii")
    return (
        f"<figure style='display:inline-block;margin:4px'><img src='data:image/jpeg;base64,{data}'"
        f" alt='{_e(path.name)}'><figcaption>{_link(path, path.name)}</figcaption></figure>"
    )


# ---------------------------------------------------------------------------------------
# SliceCatalog
# ---------------------------------------------------------------------------------------
def catalog_html(cat: Any) -> str:
    z, y, x = cat.shape_zyx
    real = [s for s in cat.slices if s.fill is None]
    files = len({s.path for s in real if s.path})
    rows = [
        ("slices", f"{z} ({files} file(s))"),
        ("slice size", f"x {x} × y {y} px, {_e(cat.dtype)}"),
        ("voxels", _gb(cat.nbytes)),
        ("first", f"<code>{_e(real[0].path)}</code>" if real else "-"),
        ("last", f"<code>{_e(real[-1].path)}</code>" if real else "-"),
    ]
    if cat.missing:
        from emflow.discover import _ranges

        rows.append(
            ("missing", f"<span class='bad'>source z {_e(_ranges(cat.missing))}</span> (filled)")
        )
    return _box("SliceCatalog", _table(("", ""), rows))


# ---------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------
def plan_html(plan: Any) -> str:
    ny, nx = plan.frame_shape_yx
    head = (
        f"frame x {nx} × y {ny} px, {plan.levels[0].shape_zyx[0]} slices, "
        f"{_e(plan.in_dtype)} → {_e(plan.out_dtype)}; memory budget per unit "
        f"{_gib(plan.unit_budget)} ({_e(plan.budget_source)})"
    )
    levels = _table(
        ("level", "x × y × z voxels", "voxel x × y × z nm", "factor (zyx)"),
        (
            (
                lev.index,
                _xyz(lev.shape_zyx),
                " × ".join(f"{v:g}" for v in lev.voxel_size_nm_zyx[::-1]),
                "×".join(str(f) for f in lev.factor_zyx),
            )
            for lev in plan.levels
        ),
        num=(0,),
    )
    stages: list[tuple[str, int, str, str, int]] = []
    if plan.render_stage:
        n = plan.levels[0].shape_zyx[0]
        stages.append(("render", n, "one slice", "0 (copy in the run folder)", plan.render_memory))
    for p in plan.passes:
        stages.append(
            (
                p.stage,
                p.n_units,
                f"x {p.brick_zyx[2]} × y {p.brick_zyx[1]} × z {p.brick_zyx[0]} of level {p.source}",
                f"{p.source}..{p.last}",
                p.memory,
            )
        )
    stage_table = _table(
        ("stage", "units", "unit", "levels written", "memory per unit"),
        ((_e(s), n, _e(u), lv, _gib(m)) for s, n, u, lv, m in stages),
        num=(1,),
    )
    return _box("Plan", head, levels, stage_table)


# ---------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------
KINDS = ("neighbour", "second", "bridge")
STATUSES = ("matched", "failed", "rejected")


def pair_kind(pair: Any) -> str:
    d = abs(int(pair.z_b) - int(pair.z_a))
    return "neighbour" if d == 1 else "second" if d == 2 else "bridge"


def pair_summary(alignment: Any) -> dict[str, dict[str, int]]:
    """Pairs by kind (neighbour z+1, second z+2, bridge) and status (matched / failed /
    rejected): the alignment's own :meth:`pair_summary` where it has one."""
    own = getattr(alignment, "pair_summary", None)
    if callable(own):
        return own()
    rejected = {(a, b) for a, b, _ in alignment.rejected_pairs}
    out = {k: dict.fromkeys(STATUSES, 0) for k in KINDS}
    for p in alignment.pairs:
        status = "failed" if not p.ok else "rejected" if (p.z_a, p.z_b) in rejected else "matched"
        out[pair_kind(p)][status] += 1
    return out


def pair_totals(alignment: Any) -> dict[str, int]:
    """Pairs matched / failed / rejected over all kinds."""
    summary = pair_summary(alignment)
    return {s: sum(summary[k].get(s, 0) for k in summary) for s in STATUSES}


def alignment_text(alignment: Any) -> str:
    """One line: method, frame, pairs matched / failed / rejected, bad slices."""
    t = pair_totals(alignment)
    ny, nx = alignment.frame_shape_yx
    line = (
        f"alignment ({alignment.method}): {len(alignment.transforms)} slices, frame x {nx} × "
        f"y {ny} px; pairs: {t['matched']} matched, {t['failed']} failed, "
        f"{t['rejected']} rejected"
    )
    if alignment.bad_slices:
        line += f"; bad slices: {', '.join(f'z{z}' for z in sorted(alignment.bad_slices))}"
    return line


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f" … and {more} more" if more > 0 else "")


def alignment_html(alignment: Any) -> str:
    ny, nx = alignment.frame_shape_yx
    summary = pair_summary(alignment)
    head = (
        f"method {_e(alignment.method)}, {len(alignment.transforms)} slices, output frame "
        f"x {nx} × y {ny} px, bad-slice policy {_e(alignment.bad_slice_policy)}"
    )
    cropped = getattr(alignment, "cropped", None)
    if cropped:
        z = max(cropped, key=lambda k: cropped[k])
        head += (
            f"; frame {_e(alignment.frame)} crops {len(cropped)} slices' edges, at most "
            f"{100 * cropped[z]:.1f} % of z{z} (align.frame: union keeps them)"
        )
    kinds = [k for k in summary if sum(summary[k].values())]
    table = _table(
        ("pairs", *STATUSES),
        [
            (
                _e(k),
                summary[k].get("matched", 0),
                *(
                    f"<span class='bad'>{summary[k].get(s, 0)}</span>"
                    if summary[k].get(s, 0)
                    else "0"
                    for s in ("failed", "rejected")
                ),
            )
            for k in kinds
        ],
        num=(1, 2, 3),
    )
    parts = [head, table]
    if alignment.bad_slices:
        bad = [f"z{z} ({_e(r)})" for z, r in sorted(alignment.bad_slices.items())]
        parts.append(f"<span class='bad'>bad slices</span>: {_listed(bad)}<br>")
    failed = [f"z{p.z_a}→z{p.z_b}: {_e(p.reason)}" for p in alignment.pairs if not p.ok]
    if failed:
        parts.append(f"failed: {_listed(failed)}<br>")
    failed_keys = {(p.z_a, p.z_b) for p in alignment.pairs if not p.ok}
    rejected = [
        f"z{a}→z{b}: {_e(r)}" for a, b, r in alignment.rejected_pairs if (a, b) not in failed_keys
    ]
    if rejected:
        parts.append(f"rejected: {_listed(rejected)}<br>")
    breaks = getattr(alignment, "segment_breaks", None) or []
    if breaks:
        parts.append(
            "<span class='bad'>segment breaks</span> (expect a jump): "
            + ", ".join(f"z{a}|z{b}" for a, b in breaks)
            + "<br>"
        )
    return _box("Alignment", *parts)


# ---------------------------------------------------------------------------------------
# RunResult
# ---------------------------------------------------------------------------------------
def _format_name(path: Path) -> str:
    if (path / "info").is_file():
        return "neuroglancer precomputed"
    if (path / "zarr.json").is_file():
        return "OME-Zarr 0.5 (Zarr v3)"
    if (path / ".zattrs").is_file():
        return "OME-Zarr 0.4 (Zarr v2)"
    return "?"


def stage_units(result: Any) -> dict[str, int]:
    """Units of each stage the run executed (as far as the result knows them)."""
    units: dict[str, int] = {}
    n = len(result.catalog.slices)
    if "features" in result.stage_seconds:
        units["features"] = n
    if "match" in result.stage_seconds and result.alignment is not None:
        units["match"] = len(result.alignment.pairs)
    for stage, count, _mem in result.plan.stages():
        units[stage] = count
    return units


def run_text(result: Any) -> list[str]:
    """The run in a few lines: time and rate, stages, alignment, outputs, run folder."""
    lines = [
        f"done in {result.seconds:.1f} s: {len(result.catalog.slices)} slices, "
        f"{result.bytes_in / 1e6:.0f} MB at {result.mb_per_s:.1f} MB/s"
    ]
    units = stage_units(result)
    lines.append(
        "stages: "
        + ", ".join(
            f"{s} {units[s]} units {sec:.1f} s" if s in units else f"{s} {sec:.1f} s"
            for s, sec in result.stage_seconds.items()
        )
    )
    if result.alignment is not None:
        lines.append(alignment_text(result.alignment))
    z, y, x = result.plan.levels[0].shape_zyx
    for name, path in result.output_paths.items():
        lines.append(
            f"output {name}: {path} ({_format_name(Path(path))}, {len(result.plan.levels)} "
            f"levels, level 0 x {x} × y {y} × z {z})"
        )
    qc = Path(result.run_dir) / "qc"
    if (qc / "reslices.png").is_file():
        lines.append(f"QC: {qc / 'reslices.png'}, {qc / 'pairs.png'}")
    lines.append(f"run folder: {result.run_dir} (run.log, alignment.json, journal)")
    return lines


def run_html(result: Any) -> str:
    lev0 = result.plan.levels[0]
    head = (
        f"{len(result.catalog.slices)} slices → frame x {lev0.shape_zyx[2]} × y "
        f"{lev0.shape_zyx[1]} px, {len(result.plan.levels)} levels; "
        f"{result.seconds:.1f} s, {result.bytes_in / 1e6:.0f} MB read at "
        f"{result.mb_per_s:.1f} MB/s"
    )
    units = stage_units(result)
    stages = _table(
        ("stage", "units", "seconds"),
        (
            (_e(s), units.get(s, ""), f"{sec:.1f}")
            for s, sec in [*result.stage_seconds.items(), ("total", result.seconds)]
        ),
        num=(1, 2),
    )
    outputs = _table(
        ("output", "format", "path"),
        (
            (f"<b>{_e(name)}</b>", _e(_format_name(Path(p))), _link(Path(p)))
            for name, p in result.output_paths.items()
        ),
    )
    parts = [head, stages, outputs]
    if result.alignment is not None:
        parts.append(_e(alignment_text(result.alignment)) + "<br>")
    run_dir = Path(result.run_dir)
    qc = run_dir / "qc"
    thumbs = "".join(
        thumbnail_html(qc / name) for name in ("reslices.png", "pairs.png") if (qc / name).is_file()
    )
    if thumbs:
        parts.append(f"<div>{thumbs}</div>")
    parts.append(
        f"run folder {_link(run_dir)}: {_link(run_dir / 'run.log', 'run.log')}"
        + (
            f", {_link(run_dir / 'alignment.json', 'alignment.json')}"
            if (run_dir / "alignment.json").is_file()
            else ""
        )
        + " · open a level with <code>emflow.open(result, level=0)</code> · view it in "
        "neuroglancer with <code>emflow.serve(result)</code>"
    )
    return _box("RunResult", *parts)
