"""Where a features unit's CPU goes beyond SIFT: decode, QC, slice cache, working copies, saving.

Runs the real unit (:func:`emflow.align_stage.features_unit`, default settings, one OpenCV
thread) on slices of the benchmark PNG stack under a CPU-time profiler and attributes its
CPU-seconds to the parts the unit is made of: PNG decode, slice QC (``assess_slice``), the
zstd slice cache, the block means (``block_means``: one reduction of the slice and its fill
mask, shared by the QC and the fine working copy; the coarse copy's inside "working copies"
too), SIFT (``detectAndCompute``, fine and coarse), the working copies (fill mask,
percentile stretch), the area copy, the thumbnail, and saving the ``.npz``.
CPU-seconds of this process (``time.process_time``), so the figures survive a loaded machine.

    python -m benchmarks.feature_parts [--size 2048] [--slices 8]

Prints a table and one JSON line (seconds per slice per part).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time

#: profiled functions -> part (cumulative CPU-s; the first match of a call path counts)
PARTS = {
    "read_image": "decode (PNG)",
    "block_means": "block means (shared by slice QC and the working copy)",
    "assess_slice": "slice QC",
    "store_slice": "slice cache (zstd-1)",
    "detectAndCompute": "SIFT (fine + coarse)",
    "working_copy": "working copies (block mean, mask, stretch)",
    "area_copy": "area copy",
    "thumbnail": "thumbnail",
    "put_bytes": "save .npz",
    "savez": "save .npz",
    "footprint_pose": "footprint",
}


#: slices of the cached benchmark stack of each size (benchmarks.__main__)
STACKS = {256: 32, 2048: 128, 4096: 16}


def measure(size: int = 2048, slices: int = 8) -> dict:
    """CPU-s per slice of each part of a features unit, on ``slices`` slices of ``size``²."""
    import cv2

    from benchmarks.data import ensure_png_stack
    from emflow.align_stage import features_unit
    from emflow.discover import SliceRef

    cv2.setNumThreads(1)
    nz = STACKS.get(size, max(slices, 16))  # the stacks the e2e sections already cache
    _, paths = ensure_png_stack((nz, size, size))
    paths = paths[:slices]
    refs = [SliceRef(z, z, str(p), 0) for z, p in enumerate(paths)]
    with tempfile.TemporaryDirectory() as tmp:
        features_unit(refs[0], (size, size), None, 4000, f"{tmp}/warm-up.npz")  # imports
        prof = cProfile.Profile(time.process_time)
        c0, w0 = time.process_time(), time.perf_counter()
        prof.enable()
        for ref in refs:
            features_unit(
                ref, (size, size), None, 4000, f"{tmp}/z{ref.z}.npz", cache_dir=f"{tmp}/cache"
            )
        prof.disable()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for (_, _, name), (_, _, _, cum, _) in stats.items():
        for key, part in PARTS.items():
            if name == key or name.startswith(f"<method '{key}' "):
                parts[part] = parts.get(part, 0.0) + cum
    per = {k: round(v / slices, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    sift = per.get("SIFT (fine + coarse)", 0.0)
    total = cpu / slices
    return {
        "size": size,
        "slices": slices,
        "cpu_s_per_slice": round(total, 4),
        "wall_s_per_slice": round(wall / slices, 4),
        "sift_s_per_slice": sift,
        "beyond_sift_s_per_slice": round(total - sift, 4),
        "parts_s_per_slice": per,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--slices", type=int, default=8)
    a = p.parse_args(argv)
    r = measure(a.size, a.slices)
    print(f"features unit, {a.size}² PNG, {a.slices} slices: CPU-s per slice (one thread)")
    print(f"  {'total':44s} {r['cpu_s_per_slice']:.3f}  (wall {r['wall_s_per_slice']:.3f})")
    for part, s in r["parts_s_per_slice"].items():
        print(f"  {part:44s} {s:.3f}")
    print(f"  {'beyond SIFT':44s} {r['beyond_sift_s_per_slice']:.3f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
