"""``python -m benchmarks``: limits, end-to-end runs, peers, scaling, overhead, alignment.

Everything runs in one process tree from here: kernels in this process (single thread),
each end-to-end variant as a measured child process. Writes benchmarks/out/results.json and
regenerates benchmarks/RESULTS.md (``--quick`` writes benchmarks/out/RESULTS.quick.md instead,
so a smoke run never replaces the committed table).

    python -m benchmarks                    # 128 x 2048² PNG, 3 repeats per variant
    python -m benchmarks --quick            # 32 x 256², 1 repeat, small overhead plan
    python -m benchmarks --sections limits,e2e --repeat 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

from benchmarks import e2e, limits, machine, report
from benchmarks.data import OUT, ensure_png_stack, read_stack
from benchmarks.proc import dir_stats, run_measured

#: variants measured once (CLAHE and alignment take minutes at full size)
HEAVY = ("both+clahe", "full")
SECTIONS = ("limits", "e2e", "peers", "scaling", "big", "overhead", "alignment", "profile")
#: the large stacks of section "big": uncompressed uint8 TIFF (z, y, x), and the full
#: pipeline (alignment + CLAHE + both outputs) on 4096² PNG slices
BIG_STACKS = ((64, 8192, 8192), (32, 16384, 16384), (256, 4096, 4096))
#: the big stack 1 -> 2 workers is measured on as well (where a second of start-up is ~5 %
#: of a run, against ~17 % on the 2048² stack); at most this many rounds
BIG_SCALING, BIG_SCALING_REPEATS = (64, 8192, 8192), 3
FULL_4096 = (32, 4096, 4096)
BIGMEM_LOCK = "/tmp/emflow-bigmem.lock"
HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load1 {machine.load1():.2f}] {msg}",
        file=sys.stderr,
        flush=True,
    )


def section_limits(res: dict, quick: bool, size: int) -> None:
    log("limits: generating inputs")
    inputs = limits.sample_inputs(size=256 if quick else 2048, chunk=64)
    l0 = machine.load1()
    kernels = limits.measure_all(inputs, quick=quick, scratch=OUT / "scratch")
    # emflow's own downsample kernel, for comparison with the reference kernel
    try:
        from emflow.pyramid import downsample_levels

        steps = [(2, 2, 2)] * (limits.LEVELS - 1)
        block = inputs["block"]
        s = limits._timeit(
            lambda: downsample_levels(block, steps), 1 if quick else 3, 1 if quick else 3
        )
        kernels["downsample_emflow_pyramid"] = limits._result(
            block.nbytes, s, "level-0 bytes", kernel="emflow.pyramid.downsample_levels"
        )
    except ImportError as exc:
        res["notes"].append(f"emflow.pyramid.downsample_levels not measured: {exc}")
    res["limits"] = {
        "kernels": kernels,
        "model": limits.cost_model(kernels, cores=2),
        "load1_before": l0,
        "load1_after": machine.load1(),
        "runs": 1 if quick else 3,
    }
    res["notes"].append(f"CLAHE limit measured with {kernels['clahe']['impl']}")
    log("limits: " + ", ".join(f"{k} {v['mb_s']:.0f}" for k, v in kernels.items()))


def _quality(res: dict, name: str, kind: str, out_dir: Path, source) -> None:
    """Read back every pyramid of a variant. CLAHE/alignment change the voxels, so those
    variants are checked against their own lossless level 0 (the OME-Zarr output) instead
    of the source: L0 exactness is then n/a, the bias per level still applies."""
    from benchmarks.quality import _find, _omezarr_levels, check_tree, summarize

    reference, ref_name = source, "source"
    if kind in ("both+clahe", "full"):
        zarrs = [p for k, p in _find(out_dir) if k == "omezarr"]
        if not zarrs:
            res["notes"].append(f"{name}: no OME-Zarr output to use as reference; not checked")
            return
        reference, ref_name = _omezarr_levels(zarrs[0])[0][0], "own OME-Zarr level 0"
    for key, rows in check_tree(out_dir, reference).items():
        summary = summarize(rows)
        summary["reference"] = ref_name
        if ref_name != "source":
            summary.pop("l0_bit_exact", None)
            summary.pop("l0_psnr_db", None)
        res["quality"][f"{name} {key}"] = summary
        res["quality_levels"][f"{name} {key}"] = rows


def section_e2e(res: dict, args, src: Path, source, sections: set[str]) -> None:
    work = OUT / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    nz, lv = args.slices, args.levels
    variants = []
    if "e2e" in sections:
        # each ceiling runs right before emflow's same-format variant, so each repeat gives one
        # adjacent pair (load drifts hit both alike): the ceiling ratios are medians of pairs
        for k in ("jpeg", "zarr", "both"):
            variants.append(e2e.ceiling_variant(k, src, work, lv))
            variants.append(e2e.emflow_variant(f"emflow-{k}", k, src, nz, work, lv))
        variants.append(e2e.emflow_variant("emflow-both-clahe", "both+clahe", src, nz, work, lv))
        # alignment costs seconds per slice: the full pipeline runs on the first slices only
        nf = min(nz, args.full_slices)
        full = e2e.emflow_variant(
            "emflow-full", "full", src, nf, work, lv, input_bytes=nf * args.size * args.size
        )
        full.format_note += f" (first {nf} slices)"
        variants.append(full)
        # the fixed cost of one `emflow run` (interpreter, imports, LocalCluster, plan,
        # finalize): the same command on a tiny 32 x 256² stack
        tiny, _ = ensure_png_stack((32, 256, 256))
        fixed = e2e.emflow_variant("emflow-fixed-cost", "both", tiny, 32, work, 3)
        fixed.family, fixed.format_note = "fixed", "both, on 32 x 256² (2 MB): start-up cost"
        variants.append(fixed)
    if "peers" in sections:
        for peer in e2e.PEER_VARIANTS:
            log(f"peers: venv {peer}")
            variants.append(e2e.peer_variant(peer, src, work, lv))
    runs: dict[str, list] = {v.name: [] for v in variants}
    frame = args.size * args.size
    for rep in range(args.repeat):
        for v in variants:
            if v.skip:
                continue
            if rep > 0 and runs[v.name] and runs[v.name][-1].returncode != 0:
                continue  # failed once: do not repeat a failure
            if rep > 0 and v.kind in HEAVY:
                continue  # minutes per run: once is enough next to the lighter variants
            m = e2e.measure_variant(v)
            runs[v.name].append(m)
            log(
                f"e2e {v.name} rep {rep}: rc {m.returncode} wall {m.wall_s:.2f} s cpu "
                f"{m.cpu_s:.1f} s load1 {m.load1_before}"
            )
            if rep == 0 and m.returncode == 0 and v.family != "fixed":  # tiny stack: no check
                _quality(res, v.name, v.kind, v.out_dir, source)
    model = res.get("limits", {}).get("model", {})
    for v in variants:
        if v.skip:
            res["e2e"].append(
                {
                    "name": v.name,
                    "family": v.family,
                    "kind": v.kind,
                    "format": v.format_note,
                    "skip": v.skip,
                }
            )
            res["notes"].append(f"{v.name} skipped: {v.skip}")
            continue
        row = e2e.summarize_runs(v, runs[v.name], source.nbytes, frame, model)
        res["e2e"].append(row)
        if "error" in row:
            res["notes"].append(f"{v.name} failed: {row['error'][:300]}")
    by = {r["name"]: r for r in res["e2e"] if r.get("wall_s")}
    fixed_row = by.get("emflow-fixed-cost")
    if fixed_row:
        for r in res["e2e"]:
            if r.get("family") == "emflow" and r.get("wall_s"):
                e2e.net_of_fixed(r, fixed_row, source.nbytes)

    def ratio(key: str, num: str, den: str, meaning: str) -> None:
        if num in by and den in by:
            res["ratios"][key] = {
                "ratio": by[num]["wall_s"] / by[den]["wall_s"],
                "meaning": meaning,
            }

    ratio(
        "emflow JPEG vs igneous",
        "igneous-jpeg",
        "emflow-jpeg",
        "igneous wall ÷ emflow wall (> 1: emflow faster); target ≥ 1.45",
    )
    ratio("emflow zarr vs ngff-zarr", "ngff-zarr", "emflow-zarr", "ngff-zarr wall ÷ emflow wall")
    ratio(
        "emflow zarr vs ome-zarr-py", "ome-zarr-py", "emflow-zarr", "ome-zarr-py wall ÷ emflow wall"
    )
    for k in ("jpeg", "zarr", "both"):
        ratio(
            f"emflow {k} vs ceiling",
            f"ceiling-{k}",
            f"emflow-{k}",
            "ceiling wall ÷ emflow wall (1 = as fast as the hand-written pipeline)",
        )
        paired = paired_ratios(runs.get(f"ceiling-{k}", []), runs.get(f"emflow-{k}", []))
        if paired:
            res["ratios"][f"emflow {k} vs ceiling, paired"] = {
                "ratio": statistics.median(paired),
                "pairs": paired,
                "meaning": "median over repeats of ceiling wall ÷ emflow wall, each pair run "
                "back to back; range " + f"{min(paired):.2f}–{max(paired):.2f}, n = {len(paired)}",
            }
    ratio("ceiling JPEG vs igneous", "igneous-jpeg", "ceiling-jpeg", "igneous ÷ ceiling")
    ratio("CLAHE cost", "emflow-both-clahe", "emflow-both", "wall with CLAHE ÷ without")
    ratio("alignment + CLAHE cost", "emflow-full", "emflow-both", "full pipeline ÷ pyramid only")


def paired_ratios(num: list, den: list) -> list[float]:
    """Wall ratios num[i] ÷ den[i] of the repeats where both runs succeeded (same repeat = adjacent
    runs of the same input)."""
    return [
        a.wall_s / b.wall_s
        for a, b in zip(num, den, strict=False)
        if a.returncode == 0 and b.returncode == 0 and a.wall_s and b.wall_s
    ]


ONE_CORE = "1 worker × 1 thread, pinned to 1 core"
TWO_WORKERS = "2 workers × 1 thread"


def scaling_variants(
    prefix: str, kind: str, src: Path, nz: int, work: Path, levels: int | None
) -> list[tuple[str, e2e.Variant]]:
    """The two configurations 1 → 2 workers compares: one worker with one thread on one core
    (the whole process tree pinned there) and two one-thread workers on both cores."""
    return [
        (ONE_CORE, e2e.emflow_variant(f"{prefix}-1w-1core", kind, src, nz, work, levels,
                                      workers=1, threads=1, pin_cores="0")),
        (TWO_WORKERS, e2e.emflow_variant(f"{prefix}-2w", kind, src, nz, work, levels,
                                         workers=2, threads=1)),
    ]  # fmt: skip


def alternate_scaling(
    variants: list[tuple[str, e2e.Variant]],
    repeats: int,
    input_bytes: int,
    frame: int,
    model: dict,
    what: str = "scaling",
) -> dict:
    """Run the configurations in turn, ``repeats`` rounds (load drifts hit each alike), and
    return ``{"runs": {label: median row}, "ratios": {...}}``: the 1 → 2 worker speed-up of the
    wall and of the stages alone (journal span: first stage to last stage_end), and the seconds
    outside the stages (start-up, exit) in each configuration."""
    ms: dict[str, list] = {label: [] for label, _ in variants}
    staged: dict[str, list[float]] = {label: [] for label, _ in variants}
    for rep in range(max(1, repeats)):
        for label, v in variants:
            if ms[label] and ms[label][-1].returncode:
                continue  # failed once: do not repeat a failure
            m = e2e.measure_variant(v, timeout_s=3600)
            ms[label].append(m)
            span = e2e.stages_span_s(v.out_dir) if m.returncode == 0 else None
            if span:
                staged[label].append(span)
            log(f"{what} {label} rep {rep}: rc {m.returncode} wall {m.wall_s:.2f} s")
    out: dict = {"runs": {}, "ratios": {}}
    for label, v in variants:
        out["runs"][label] = e2e.summarize_runs(v, ms[label], input_bytes, frame, model)
        if staged[label]:
            out["runs"][label]["stages_span_s"] = statistics.median(staged[label])
    r = out["runs"]
    one, two = r[ONE_CORE].get("wall_s"), r[TWO_WORKERS].get("wall_s")
    if one and two:
        out["ratios"][report.SPEED_UP] = one / two
        out["ratios"]["parallel efficiency (speed-up / 2)"] = one / two / 2
    s1, s2 = r[ONE_CORE].get("stages_span_s"), r[TWO_WORKERS].get("stages_span_s")
    if one and two and s1 and s2:
        out["ratios"][report.STAGES_SPEED_UP] = s1 / s2
        out["ratios"]["outside the stages s (start-up, exit), 1 worker"] = one - s1
        out["ratios"]["outside the stages s, 2 workers"] = two - s2
    return out


def section_scaling(res: dict, args, src: Path, source) -> None:
    work = OUT / "scaling"
    frame = args.size * args.size
    model = res.get("limits", {}).get("model", {})
    variants = [
        *scaling_variants("scale", "both", src, args.slices, work, args.levels),
        (
            "default local cluster (1 worker × 2 threads)",
            e2e.emflow_variant("scale-default", "both", src, args.slices, work, args.levels),
        ),
    ]
    out = alternate_scaling(variants, args.repeat, source.nbytes, frame, model)
    out["input"] = f"{args.slices} × {args.size}² PNG ({source.nbytes / 1e9:.2f} GB)"
    default = out["runs"]["default local cluster (1 worker × 2 threads)"].get("wall_s")
    two = out["runs"][TWO_WORKERS].get("wall_s")
    if default and two:
        out["ratios"]["default (1 worker × 2 threads) / 2 workers wall"] = default / two
    res["scaling"] = out


def _limits_now(res: dict, args, before: str) -> dict:
    """The per-core kernels measured again now (this machine's speed drifts by tens of % within
    an hour: SIFT 7.5 -> 10.0 MB/s per core in 20 min on 2026-12-03), kept in
    ``res["limits_again"]`` and named in the notes; returns them."""
    l0 = machine.load1()
    inputs = limits.sample_inputs(size=256 if args.quick else 2048, chunk=64)
    kernels = limits.measure_all(inputs, quick=args.quick, scratch=OUT / "scratch")
    res.setdefault("limits_again", []).append(
        {"before": before, "kernels": kernels, "load1_before": l0, "at": time.time()}
    )
    first = res.get("limits", {}).get("kernels", {})
    said = ", ".join(
        f"{k} {kernels[k]['mb_s']:.1f}"
        + (f" (section 1: {first[k]['mb_s']:.1f})" if k in first else "")
        for k in ("png_decode", "jpeg_q90_encode", "sift_feature_copy", "page_cache_growth")
        if k in kernels
    )
    res["notes"].append(
        f"Limits measured again before {before} (MB/s per core: {said}); its % of limit uses them."
    )
    log(f"limits again before {before}: {said}")
    return kernels


def section_big(res: dict, args) -> None:
    """Large stacks on the default local cluster (held under the machine's big-memory lock):
    8192² x 64, 16384² x 32 and 4096² x 256 uncompressed TIFF to both outputs, and the full
    pipeline on 4096² PNG slices. Figures: MB/s, % of the derived limit, peak worker RSS over
    the plan's largest unit; and 1 -> 2 workers on the 8192² stack (``res["scaling_big"]``)."""
    import fcntl

    from benchmarks.bigdata import ensure_tiff_stack, warm

    work = OUT / "big"
    rows = []
    with open(BIGMEM_LOCK, "w") as lock:
        log(f"big: waiting for {BIGMEM_LOCK}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        stacks = [(64, 1024, 1024)] if args.quick else BIG_STACKS
        model = limits.cost_model(_limits_now(res, args, "the big TIFF stacks"), cores=2)
        for shape in stacks:
            src = ensure_tiff_stack(shape)
            nz, ny, nx = shape
            name = f"emflow-tiff-{nx}x{ny}x{nz}"
            v = e2e.emflow_variant(name, "both-tiff", src, nz, work, None)
            v.format_note += f" ({nx}² x {nz})" if nx == ny else f" ({nx} x {ny} x {nz})"
            w = warm(src)
            cached = "?" if w["cached_before"] is None else f"{100 * w['cached_before']:.0f} %"
            v.format_note += (
                f"; input warmed before the run ({cached} was in the page cache; read "
                f"{w['bytes'] / 1e9:.1f} GB in {w['seconds']:.0f} s, untimed)"
            )
            log(f"big {name}: warmed {json.dumps(w)}")
            m = e2e.measure_variant(v, timeout_s=3600)
            log(f"big {name}: rc {m.returncode} wall {m.wall_s:.1f} s")
            rows.append(e2e.summarize_runs(v, [m], nz * ny * nx, ny * nx, model))
            shutil.rmtree(v.out_dir, ignore_errors=True)  # GBs: keep only the figures
            if shape == BIG_SCALING or args.quick:
                pair = scaling_variants(f"scale-{nx}", "both-tiff", src, nz, work, None)
                out = alternate_scaling(
                    pair, min(args.repeat, BIG_SCALING_REPEATS), nz * ny * nx, ny * nx, model,
                    what=f"big scaling {nx}",
                )  # fmt: skip
                out["input"] = f"{nz} × {nx}² uncompressed TIFF ({nz * ny * nx / 1e9:.1f} GB)"
                res["scaling_big"] = out
                for _, pv in pair:
                    shutil.rmtree(pv.out_dir, ignore_errors=True)
        shape = (4, 1024, 1024) if args.quick else FULL_4096
        src, _ = ensure_png_stack(shape)
        nz, ny, nx = shape
        kernels = _limits_now(res, args, f"emflow-full-{nx}")
        model = limits.cost_model(kernels, cores=2)
        v = e2e.emflow_variant(f"emflow-full-{nx}", "full", src, nz, work, args.levels)
        v.format_note += f" ({nx}² x {nz} PNG)"
        m = e2e.measure_variant(v, timeout_s=3600)
        log(f"big full {nx}: rc {m.returncode} wall {m.wall_s:.1f} s")
        full_model = dict(model)
        if "full" in model:  # SIFT runs on a working copy of at most 1024 px: per slice, not per
            full_model["full"] = limits.full_limit_at(kernels, nx, args.size)
        row = e2e.summarize_runs(v, [m], nz * ny * nx, ny * nx, full_model)
        rows.append(row)
        shutil.rmtree(v.out_dir, ignore_errors=True)
    res["big"] = rows


def section_overhead(res: dict, quick: bool) -> None:
    slices, units = (5_000, 200) if quick else (100_000, 2_000)
    l0 = machine.load1()
    m = run_measured(
        [
            sys.executable,
            "-m",
            "benchmarks.overhead",
            "--slices",
            str(slices),
            "--units",
            str(units),
        ],
        cwd=HERE.parent,
        timeout_s=900,
    )
    o = dict(m.result) if m.result else {"error": m.stderr_tail[-800:]}
    o["load1_before"] = l0
    o["process_wall_s"] = m.wall_s
    res["overhead"] = o
    log(f"overhead: {json.dumps(o)[:400]}")


def section_alignment(res: dict, quick: bool) -> None:
    """Seconds per slice per core of features + 2 matches (benchmarks/align_cost.py)."""
    from benchmarks.align_cost import measure_details

    sizes = (512,) if quick else (1024, 2048, 4096)
    l0 = machine.load1()
    try:
        figures = {int(k): v for k, v in measure_details(sizes).items()}
    except Exception as exc:  # a report entry, not the end of the whole benchmark run
        res["alignment"] = {
            "note": f"align_cost.measure_details() failed: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
        }
        return
    for size, d in figures.items():
        sec = d.get("seconds_per_slice_per_core")
        if sec:
            d["mb_s_per_core"] = size * size / 1e6 / sec
            d["cpu_s_per_gb"] = sec / (size * size / 1e9)
    res["alignment"] = {
        "figures": figures,
        "how": "align_cost.measure_details(sizes)",
        "sizes": list(sizes),
        "load1_before": l0,
        "load1_after": machine.load1(),
    }


def section_profile(res: dict, args, src: Path) -> None:
    from benchmarks.profile import profile

    res["profile"] = {}
    for kind in ("both",):  # full/CLAHE: their stage split comes from emflow's own timings
        v = e2e.emflow_variant(
            f"profile-{kind}", kind, src, args.slices, OUT / "profile", args.levels
        )
        log(f"profile: emflow {kind} under py-spy")
        res["profile"][f"emflow {kind}"] = profile(
            v.cmd, OUT / "profile" / f"{kind}.raw", HERE.parent, v.env
        )


#: what each section puts into the results (``--keep-from`` copies these)
SECTION_KEYS = {
    "limits": ("limits",),
    "e2e": ("e2e", "quality", "quality_levels", "ratios"),
    "scaling": ("scaling",),
    "big": ("big", "scaling_big"),
    "overhead": ("overhead",),
    "alignment": ("alignment",),
    "profile": ("profile",),
}


def keep_sections(res: dict, old: dict, ran: set[str]) -> None:
    """Take the sections not in ``ran`` from an earlier run's results (``old``), noted."""
    ran = ran | ({"e2e"} if "peers" in ran else set())
    kept = [
        name
        for name, keys in SECTION_KEYS.items()
        if name not in ran and any(old.get(k) for k in keys)
    ]
    for name in kept:
        for k in SECTION_KEYS[name]:
            if old.get(k):
                res[k] = old[k]
    if kept:
        om = old.get("machine", {})
        load = " / ".join(str(x) for x in om.get("loadavg_1_5_15", []))
        res["kept"] = {
            "sections": kept,
            "utc": om.get("utc"),
            "load": load,
            "command": old.get("config", {}).get("command"),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke size: 32 x 256², 1 repeat")
    p.add_argument("--size", type=int, default=2048, help="slice width = height (px)")
    p.add_argument("--slices", type=int, default=128)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="runs per end-to-end variant")
    p.add_argument(
        "--full-slices",
        type=int,
        default=32,
        help="slices for the full pipeline (alignment + CLAHE) variant",
    )
    p.add_argument(
        "--sections",
        default=",".join(s for s in SECTIONS if s != "profile"),
        help=f"comma list of {', '.join(SECTIONS)}",
    )
    p.add_argument("--profile", action="store_true", help="also profile emflow with py-spy")
    p.add_argument(
        "--keep-from",
        type=Path,
        default=None,
        help="an earlier results.json: the sections not run now are taken from it (the "
        "report says which run each section comes from)",
    )
    p.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="where to write the table (default: benchmarks/RESULTS.md; "
        "--quick: benchmarks/out/RESULTS.quick.md)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.slices, args.levels, args.repeat = 256, 32, 3, 1
    sections = set(args.sections.split(","))
    if args.profile:
        sections.add("profile")
    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": machine.describe(),
        "notes": [],
        "e2e": [],
        "quality": {},
        "quality_levels": {},
        "ratios": {},
    }
    log(f"machine: {res['machine']['cpu_model']}, load {res['machine']['loadavg_1_5_15']}")
    src, paths = ensure_png_stack((args.slices, args.size, args.size))
    source = read_stack(paths)  # also warms the page cache for every variant
    res["config"] = {
        "size": args.size,
        "slices": args.slices,
        "levels": args.levels,
        "repeat": args.repeat,
        "quick": args.quick,
        "cores": 2,
        "sections": sorted(sections),
        "input_mb": source.nbytes / 1e6,
        "png_mb": dir_stats(src)[1],
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.keep_from is not None:  # first: the sections run now may use kept limits
        keep_sections(res, json.loads(args.keep_from.read_text()), sections)
    t0 = time.perf_counter()
    if "limits" in sections:
        section_limits(res, args.quick, args.size)
    if sections & {"e2e", "peers"}:
        section_e2e(res, args, src, source, sections)
    if "scaling" in sections:
        section_scaling(res, args, src, source)
    if "big" in sections:
        section_big(res, args)
    if "overhead" in sections:
        section_overhead(res, args.quick)
    if "alignment" in sections:
        section_alignment(res, args.quick)
    if "profile" in sections:
        section_profile(res, args, src)
    res["total_s"] = time.perf_counter() - t0
    res["machine"]["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    (OUT / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = args.results_md or (OUT / "RESULTS.quick.md" if args.quick else HERE / "RESULTS.md")
    report.write(res, md, HERE / "findings.md")
    log(f"wrote {OUT / 'results.json'} and {md} in {res['total_s']:.0f} s")
    shutil.rmtree(OUT / "scratch", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
