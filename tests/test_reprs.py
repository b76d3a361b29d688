"""What RunResult, Plan, SliceCatalog and Alignment show in Jupyter (``_repr_html_``): the
numbers of the objects themselves (stages and times, pairs matched / failed / rejected, bad and
missing slices, outputs) and the run's QC plots as embedded thumbnails."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

import emflow
from emflow.reprs import MAX_LISTED
from emflow.testing import synthetic_slices, write_stack
from emflow.testing.misalign import misaligned_slices

pytestmark = pytest.mark.integration


class _Page(HTMLParser):
    """Text and <img> sources of an HTML fragment (checks it parses)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """10 misaligned slices numbered 0..10 with 4 missing (filled with zeros)."""
    root = tmp_path_factory.mktemp("reprs")
    slices = list(misaligned_slices(synthetic_slices((11, 300, 300), seed=6), seed=6))
    write_stack(slices, root / "src", pattern="s%03d.png")
    (root / "src" / "s004.png").unlink()
    return emflow.run(
        {
            "source": {"pattern": str(root / "src" / "s%03d.png"), "z_start": 0, "z_stop": 11,
                       "missing": "fill_zero"},
            "voxel_size_nm": [5, 5, 50],
            "output_dir": str(root / "out"),
            "outputs": [
                {"format": "precomputed", "name": "em", "encoding": "jpeg"},
                {"format": "omezarr", "name": "em.ome.zarr", "version": "0.4"},
            ],
            "align": {"enabled": True},
        },
        progress=False,
    )  # fmt: skip


def test_catalog(result):
    page = _Page(result.catalog._repr_html_())
    assert page.row("slices")[1] == "11 (10 file(s))"
    assert page.row("slice size")[1] == "x 300 × y 300 px, uint8"
    assert page.row("missing")[1] == "source z 4 (filled)"
    assert page.row("last")[1].endswith("s010.png")


def test_plan(result):
    plan = result.plan
    page = _Page(plan._repr_html_())
    for lev in plan.levels:
        z, y, x = lev.shape_zyx
        row = page.row(str(lev.index))
        assert row[1] == f"{x} × {y} × {z}"
        assert row[2] == " × ".join(f"{v:g}" for v in lev.voxel_size_nm_zyx[::-1])
    for stage, units, _mem in plan.stages():
        assert page.row(stage)[1] == str(units)
    assert f"frame x {plan.frame_shape_yx[1]} × y {plan.frame_shape_yx[0]} px" in page.plain


def _counts(alignment) -> dict[str, dict[str, int]]:
    """matched / failed / rejected per neighbour distance, straight from the pairs."""
    rejected = {(a, b) for a, b, _ in alignment.rejected_pairs}
    out: dict[str, dict[str, int]] = {}
    names = {1: "neighbour", 2: "second"}
    for p in alignment.pairs:
        kind = names.get(p.z_b - p.z_a, "bridge")
        status = "failed" if not p.ok else "rejected" if (p.z_a, p.z_b) in rejected else "matched"
        out.setdefault(kind, {"matched": 0, "failed": 0, "rejected": 0})[status] += 1
    return out


def test_alignment_pairs_and_bad_slices(result):
    alignment = result.alignment
    assert 4 in alignment.bad_slices  # the filled slice
    page = _Page(alignment._repr_html_())
    counts = _counts(alignment)
    assert counts["neighbour"]["failed"] >= 2  # 3-4 and 4-5 cannot match a blank slice
    for kind, c in counts.items():
        assert page.row(kind)[1:] == [str(c["matched"]), str(c["failed"]), str(c["rejected"])]
    assert "z4 (" in page.plain and "bad slices" in page.plain
    failed = [p for p in alignment.pairs if not p.ok]
    for p in failed[:MAX_LISTED]:  # the first few by name and reason, then "… and N more"
        assert f"z{p.z_a}→z{p.z_b}: {' '.join(p.reason.split())}" in page.plain
    if len(failed) > MAX_LISTED:
        assert f"… and {len(failed) - MAX_LISTED} more" in page.plain
    ny, nx = alignment.frame_shape_yx
    assert f"output frame x {nx} × y {ny} px" in page.plain
    # the misplaced slices stick out of the default (slice-size) frame: what it crops is shown
    z = max(alignment.cropped, key=lambda k: alignment.cropped[k])
    assert alignment.frame == "slice"
    assert f"at most {100 * alignment.cropped[z]:.1f} % of z{z}" in page.plain


def test_run_result(result):
    page = _Page(result._repr_html_())
    units = {"features": "11", "match": str(len(result.alignment.pairs))}
    for stage, seconds in result.stage_seconds.items():
        row = page.row(stage)
        assert row[2] == f"{seconds:.1f}"
        if stage in units:
            assert row[1] == units[stage]
    assert page.row("total")[2] == f"{result.seconds:.1f}"
    assert page.row("em")[1] == "neuroglancer precomputed"
    assert page.row("em.ome.zarr")[1] == "OME-Zarr 0.4 (Zarr v2)"
    assert str(result.output_paths["em"]) in page.plain
    t = _counts(result.alignment)
    total = {s: sum(c[s] for c in t.values()) for s in ("matched", "failed", "rejected")}
    assert (
        f"pairs: {total['matched']} matched, {total['failed']} failed, "
        f"{total['rejected']} rejected; bad slices: z4" in page.plain
    )
    # the QC plots, downscaled and embedded: decodable images of the run's own PNGs
    assert len(page.images) == 2
    for src, name in zip(page.images, ("reslices.png", "pairs.png"), strict=True):
        data = base64.b64decode(src.split(",", 1)[1])
        thumb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        full = cv2.imread(str(result.run_dir / "qc" / name), cv2.IMREAD_COLOR)
        assert thumb.shape[1] == min(560, full.shape[1])
        assert abs(thumb.shape[0] / thumb.shape[1] - full.shape[0] / full.shape[1]) < 0.01
    assert "run.log" in page.plain
    # the text summary says the same
    summary = result.summary()
    assert re.search(r"^done in [\d.]+ s: 11 slices", summary, re.M)
    assert f"{total['failed']} failed" in summary and "bad slices: z4" in summary
