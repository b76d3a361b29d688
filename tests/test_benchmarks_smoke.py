"""Smoke test of benchmarks/: the limit kernels and the read-back check run on tiny inputs.

No timing is asserted (DESIGN.md "Testing and measuring"): only that every figure is a
positive finite number with the expected keys, and that the reference pyramid and the
ceiling writer are exact where they must be.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import limits
from benchmarks.pyramid_ref import exact_means, pyramid

KERNELS = {
    "png_decode",
    "jpeg_q90_encode",
    "zstd1_encode",
    "downsample_2x_mean",
    "warp_affine_linear",
    "clahe",
    "sift_feature_copy",
    "page_cache_write",
    "page_cache_growth",
    "memcpy",
}
MODEL = {
    "jpeg",
    "zstd",
    "jpeg+zstd",
    "jpeg+zstd+clahe",
    "full",
    "full_decode_twice",
    "full_cv2_clahe",
    "jpeg+zstd+cv2_clahe",
    "jpeg+zstd_tiff",
}


def _positive(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    sl = 128 + 60 * np.sin(yy / 7.0) * np.cos(xx / 5.0) + rng.normal(0, 8, (96, 96))
    block = rng.integers(0, 256, (16, 32, 32), dtype=np.uint8)
    return {
        "slice": np.clip(sl, 0, 255).astype(np.uint8),
        "chunk": block[:, :16, :16].copy(),
        "block": block,
    }


def test_limit_kernels_return_positive_finite_figures(tiny_inputs, tmp_path):
    kernels = limits.measure_all(tiny_inputs, quick=True, scratch=tmp_path)
    assert set(kernels) == KERNELS
    for name, k in kernels.items():
        assert {"mb_s", "s_per_call", "bytes_per_call", "per"} <= set(k), name
        assert _positive(k["mb_s"]) and _positive(k["s_per_call"]), name
    assert _positive(kernels["jpeg_q90_encode"]["ratio"])
    assert _positive(kernels["zstd1_encode"]["ratio"])
    assert isinstance(kernels["clahe"]["impl"], str)
    model = limits.cost_model(kernels, cores=2)
    assert set(model) == MODEL
    for name, d in model.items():
        assert _positive(d["cpu_s_per_gb"]) and _positive(d["mb_s_limit"]), name
        assert d["mb_s_limit"] == pytest.approx(2 * d["mb_s_per_core"])
    # each richer pipeline costs at least as much as the pyramid alone
    assert model["jpeg+zstd"]["cpu_s_per_gb"] >= model["jpeg"]["cpu_s_per_gb"]
    assert model["full"]["cpu_s_per_gb"] >= model["jpeg+zstd"]["cpu_s_per_gb"]
    # TIFF input: a page-cache copy instead of a PNG decode
    assert model["jpeg+zstd_tiff"]["cpu_s_per_gb"] < model["jpeg+zstd"]["cpu_s_per_gb"]
    # SIFT runs on a working copy of at most 1024 px: per GB it costs 4x less at 4096²
    at4k = limits.full_limit_at(kernels, 4096, 2048)
    assert at4k["parts_cpu_s_per_gb"]["sift"] == pytest.approx(
        model["full"]["parts_cpu_s_per_gb"]["sift"] / 4
    )


def test_reference_pyramid_rounds_once_and_matches_emflow():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, (16, 32, 48), dtype=np.uint8)
    levels = pyramid(vol, 4, threads=2)
    assert levels[0] is vol
    for lvl in range(1, 4):
        exact = exact_means(vol, (2**lvl,) * 3)
        assert levels[lvl].shape == exact.shape
        assert np.abs(levels[lvl] - exact).max() <= 0.5
    emflow_pyramid = pytest.importorskip("emflow.pyramid")
    ref = emflow_pyramid.downsample_levels(vol, [(2, 2, 2)] * 3)
    for a, b in zip(levels[1:], ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ceiling_output_reads_back_exact(tmp_path):
    from benchmarks.ceiling import write_omezarr, write_precomputed
    from benchmarks.quality import check_tree, summarize

    rng = np.random.default_rng(2)
    vol = rng.integers(0, 256, (16, 64, 64), dtype=np.uint8)
    levels = pyramid(vol, 3)
    write_omezarr(levels, tmp_path / "img.ome.zarr", 8.0, threads=1)
    write_precomputed(levels, tmp_path / "prec", 8.0, threads=1)
    found = {k.split()[0]: summarize(v) for k, v in check_tree(tmp_path, vol).items()}
    assert set(found) == {"omezarr", "precomputed"}
    assert found["omezarr"]["l0_bit_exact"] and found["omezarr"]["levels"] == 3
    assert found["omezarr"]["max_abs_bias"] <= 0.1
    assert not found["precomputed"]["l0_bit_exact"]  # JPEG is lossy
    assert found["precomputed"]["l0_psnr_db"] > 20


def test_keep_from_takes_only_the_sections_not_run_and_the_report_names_their_run():
    from benchmarks import report
    from benchmarks.__main__ import keep_sections

    old = {
        "machine": {"utc": "2026-12-01 18:27:15", "loadavg_1_5_15": [4.68, 5.48, 5.95]},
        "config": {"command": "python -m benchmarks --sections limits,overhead"},
        "limits": {"kernels": {"memcpy": {"mb_s": 1.0, "per": "copied bytes"}}, "model": {}},
        "overhead": {"slices": 100, "ms_per_unit": 9.0, "window": 16},
        "scaling": {},  # empty in the old run: nothing to keep
    }
    new_overhead = {"slices": 100, "ms_per_unit": 1.5, "window": 16, "no_run_dir": {}}
    res = {"overhead": dict(new_overhead), "e2e": [], "quality": {}}
    keep_sections(res, old, {"overhead"})
    assert res["overhead"] == new_overhead  # the section run now is not replaced
    assert res["limits"] == old["limits"]
    assert res["kept"]["sections"] == ["limits"]
    line = (
        f"* Sections limits: kept from the run of 2026-12-01 18:27:15 UTC (load average at "
        f"start 4.68 / 5.48 / 5.95), `{old['config']['command']}`"
    )
    machine = {
        "utc": "2026-12-02 01:00:00",
        "cpu_model": "cpu",
        "logical_cores": 2,
        "ram_gib": 23.5,
        "loadavg_1_5_15": [9.0, 9.0, 9.0],
        "python": "3.11",
        "libraries": {},
    }
    config = {"command": "python -m benchmarks --sections overhead", "slices": 1, "size": 2,
              "input_mb": 0.0, "png_mb": 0.0, "levels": 1, "repeat": 1, "cores": 2}  # fmt: skip
    md = report.render({**res, "machine": machine, "config": config, "notes": []})
    assert line in md.splitlines()
    assert "| overhead per unit | 1.50 ms |" in md


def test_feature_parts_attribute_the_unit_cpu(tmp_path, monkeypatch) -> None:
    """benchmarks.feature_parts runs the real features unit and splits its CPU-s by part."""
    from benchmarks import feature_parts

    monkeypatch.setenv("EMFLOW_BENCH_DATA", str(tmp_path))
    r = feature_parts.measure(size=256, slices=2)
    parts = r["parts_s_per_slice"]
    assert {"decode (PNG)", "slice QC", "SIFT (fine + coarse)", "save .npz"} <= set(parts)
    assert all(math.isfinite(v) and v >= 0 for v in parts.values())
    assert 0 < parts["SIFT (fine + coarse)"] <= r["cpu_s_per_slice"]
    assert r["beyond_sift_s_per_slice"] == pytest.approx(
        r["cpu_s_per_slice"] - r["sift_s_per_slice"], abs=1e-3
    )


def test_writer_memory_measures_both_write_modes(tmp_path) -> None:
    """benchmarks.writer_memory writes real blocks through emflow's writers in either mode."""
    from benchmarks import writer_memory

    for reference in (True, False):
        r = writer_memory.measure((64, 128, 128), 2, reference)
        assert r["mode"] == ("reference" if reference else "copy")
        assert r["writer_mb"] >= 0 and r["per_output_voxel"] >= 0
        assert r["minflt"] >= 0 and r["user_s"] + r["sys_s"] > 0  # (warm heap: no new faults)
        assert r["stored_equal"]  # the lossless output holds the blocks, in either mode


def test_the_limit_writes_output_bytes_into_reused_pages():
    """The derived limit charges output bytes at ``page_cache_write`` (reused pages: the
    cheapest write), not at ``page_cache_growth`` (new pages), which is only reported."""
    k = {
        "png_decode": {"mb_s": 100.0}, "downsample_2x_mean": {"mb_s": 1000.0},
        "memcpy": {"mb_s": 5000.0}, "jpeg_q90_encode": {"mb_s": 200.0, "ratio": 2.0},
        "zstd1_encode": {"mb_s": 500.0, "ratio": 1.25, "decode_mb_s": 1000.0},
        "warp_affine_linear": {"mb_s": 300.0}, "clahe": {"mb_s": 100.0, "cv2_mb_s": 150.0},
        "sift_feature_copy": {"mb_s": 7.0}, "page_cache_write": {"mb_s": 3000.0},
    }  # fmt: skip
    old = limits.cost_model(k)["jpeg+zstd"]
    new = limits.cost_model({**k, "page_cache_growth": {"mb_s": 300.0}})["jpeg+zstd"]
    assert new == old
    parts = new["parts_cpu_s_per_gb"]
    assert parts["jpeg_write"] == pytest.approx(limits.LEVEL_FACTOR / 2.0 / 3.0)
    assert parts["zstd_write"] == pytest.approx(limits.LEVEL_FACTOR / 1.25 / 3.0)


def test_stages_span_is_the_last_sessions_first_stage_to_its_last_stage_end(tmp_path):
    """The scaling section splits the speed-up into the stages and the rest by this span: a
    resumed run's earlier session must not count, and start-up (before the first stage)
    and exit (after the last stage_end) must not either."""
    import json

    from benchmarks.e2e import stages_span_s

    run = tmp_path / "emflow-run"
    run.mkdir()
    events = [
        {"event": "session", "t": 0.0}, {"event": "stage", "t": 1.0, "stage": "render"},
        {"event": "stage_end", "t": 9.0, "stage": "render"},  # an earlier session
        {"event": "session", "t": 100.0}, {"event": "plan", "t": 100.5},
        {"event": "stage", "t": 101.0, "stage": "render"},
        {"event": "stage_end", "t": 103.5, "stage": "render"},
        {"event": "stage", "t": 103.6, "stage": "slab"},
        {"event": "stage_end", "t": 106.25, "stage": "slab"},
    ]  # fmt: skip
    (run / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "{torn")
    assert stages_span_s(tmp_path) == pytest.approx(5.25)
    assert stages_span_s(tmp_path / "nothing-here") is None


def test_the_full_pipeline_side_figure_adds_the_runs_match_stage_to_the_limit():
    """Beside the verdict, the report says where the full pipeline stands if the limit also
    counted the run's own first-neighbour match stage: a limit of 100 CPU-s/GB plus a 2.5 s
    match stage on 2 cores over 0.05 GB (+100 CPU-s/GB) halves the limit and doubles the %."""
    from benchmarks.report import pct_with_neighbour_match

    row = {"limit_mb_s": 20.0, "cores": 2, "mb_s": 5.0, "input_bytes": 50_000_000,
           "stage_wall_s": {"features": 9.0, "match": 2.5}}  # fmt: skip
    assert pct_with_neighbour_match(row) == pytest.approx(0.5)
    assert pct_with_neighbour_match({**row, "stage_wall_s": {"features": 9.0}}) is None
    assert pct_with_neighbour_match({}) is None


def test_one_to_two_workers_gets_a_verdict_and_a_section_per_input():
    """1 -> 2 workers is judged on each input it was measured on (the 2048² PNG stack and the
    big TIFF stack), each row naming its input; a run without the big stack keeps one row."""
    from benchmarks import report

    def scaling(one: float, two: float, on: str) -> dict:
        runs = {label: {"wall_s": w, "wall_min_s": w, "wall_max_s": w, "n": 3}
                for label, w in (("1 worker × 1 thread, pinned to 1 core", one),
                                 ("2 workers × 1 thread", two))}  # fmt: skip
        return {"input": on, "runs": runs, "ratios": {"speed-up 2 workers vs 1": one / two}}

    res = {
        "scaling": scaling(10.9, 6.2, "128 × 2048² PNG (0.54 GB)"),
        "scaling_big": scaling(36.5, 20.0, "64 × 8192² uncompressed TIFF (4.3 GB)"),
    }
    rows = [r for r in report.targets(res) if r[0].startswith("1 → 2 workers")]
    assert rows == [
        ["1 → 2 workers ≥ 1.8× (same input: 128 × 2048² PNG (0.54 GB))", "1.76×", "**missed**"],
        ["1 → 2 workers ≥ 1.8× (same input: 64 × 8192² uncompressed TIFF (4.3 GB))", "1.82×",
         "**met**"],
    ]  # fmt: skip
    del res["scaling_big"]
    assert [r[2] for r in report.targets(res) if r[0].startswith("1 → 2")] == ["**missed**"]
    md = "\n".join(report.scaling_section(scaling(36.5, 20.0, "a big stack"), big=True))
    assert "## 4a′. Scaling on a big stack: 1 vs 2 workers" in md
    assert "| 2 workers × 1 thread | 20.00 [20.00–20.00] |" in md
