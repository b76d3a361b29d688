"""QC outputs: the per-pair CSV and the plots are written and readable."""

from __future__ import annotations

import csv

import numpy as np

from emflow.align.match import PairResult
from emflow.align.qc import plot_pairs, plot_reslices, write_pair_table
from emflow.align.solve import solve


def _pairs() -> list[PairResult]:
    out = []
    for k in (1, 2):
        for a in range(6 - k):
            m = ((1.0, 0.0, 1.0 * k), (0.0, 1.0, 0.0))
            ok = 3 not in (a, a + k)
            reason = "" if ok else "too few inliers (2 < 20)"
            res = 0.4 if ok else float("nan")
            out.append(
                PairResult(
                    a, a + k, ok, reason, "translation", m, m, 150 if ok else 2, 160, res, 0.1
                )
            )
    return out


def test_pair_table_and_plots(tmp_path):
    pairs = _pairs()
    al = solve(pairs, range(6), (40, 50), detrend="none")  # exact links stay exact
    write_pair_table(pairs, al, tmp_path / "pairs.csv", shape_yx=(40, 50))
    rows = list(csv.DictReader((tmp_path / "pairs.csv").open()))
    assert len(rows) == len(pairs)
    r23 = next(r for r in rows if (r["z_a"], r["z_b"]) == ("2", "3"))
    assert r23["ok"] == "False" and r23["used"] == "False" and "inliers" in r23["reason"]
    assert float(next(r for r in rows if r["z_a"] == "0")["link_error_px"]) < 1e-6
    plot_pairs(pairs, al, tmp_path / "pairs.png", shape_yx=(40, 50))
    vol = np.random.default_rng(0).integers(0, 255, (6, 40, 50), dtype=np.uint8)
    plot_reslices(vol, vol[:, :30, :45], tmp_path / "reslices.png", (4.0, 4.0, 50.0))
    for name in ("pairs.png", "reslices.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
