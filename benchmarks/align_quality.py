"""What alignment does on real serial sections: robustness, drift, bridging, direction symmetry.

Measures, on the published VNC (20 × 1024², 45 nm) and ISBI train (30 × 512², 50 nm) stacks
from ../shared/data, at default settings unless ``--lams`` sweeps the drift control:

* pairs matched / failed / rejected per kind, registered and misplaced;
* **robustness**: each stack misplaced slice by slice (rotation ≤ 2°, translation ≤ 100 px,
  scale/shear ≤ 1 %, content kept: :func:`emflow.testing.transforms.warp_stack`), aligned, and
  compared with the registered stack's alignment up to ONE global affine (per-slice max corner
  distance, median / max); with ``--cropped`` also for misplacements that push content out of
  the frame (a changing field of view: a harder and different test);
* the same with a blank (z 6) and a noise slice (z 13) in the misplaced VNC stack;
* **drift** of the aligned registered stack: scale change first → last slice, scale/shear of
  the mean of the last 3 slices against the first 3, frame size (with ``align.detrend``
  rigid and none, ``--detrends``): the default ``align.frame: slice`` frame with the most
  it crops of any slice, and the ``union`` frame that covers every slice;
* **direction symmetry**: every neighbour pair fitted both ways, largest scale and corner
  deviation of forward ∘ backward from the identity.

Run ``python benchmarks/align_quality.py [--seeds 3,4,5] [--lams 0,0.01,0.03,0.1]
[--detrends rigid,none]`` (about
5 min on 2 idle cores at one λ; the sweep re-solves the same matches). Prints Markdown.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from emflow.align.match import linear_distortion, match_features
from emflow.align.solve import DEFAULT_REGULARISATION, solve
from emflow.align.stack import match_pairs, slice_features
from emflow.align.trend import footprint_pose
from emflow.testing.transforms import (
    compose,
    corner_error_px,
    insert_bad_slices,
    robustness_px,
    scale_change,
    warp_stack,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BAD = {6: "blank", 13: "noise"}


def load(name: str) -> np.ndarray:
    """The registered (z, y, x) uint8 stack."""
    import tifffile

    if name == "VNC":
        src = DATA / "sstem-drosophila-vnc" / "stack1" / "raw"
        return np.stack([tifffile.imread(src / f"{z:02d}.tif") for z in range(20)])
    src = DATA / "isbi2012-sstem" / "train"
    return np.stack(
        [cv2.imread(str(src / f"{z:02d}.png"), cv2.IMREAD_GRAYSCALE) for z in range(30)]
    )


def drift(al) -> dict[str, float]:
    """Scale change first -> last slice, and scale/shear of the end slices' mean linear parts."""
    zs = sorted(al.transforms)
    first = sum(al.transforms[z][:, :2] for z in zs[:3]) / 3
    last = sum(al.transforms[z][:, :2] for z in zs[-3:]) / 3
    scale, shear = linear_distortion(np.hstack([np.linalg.inv(first) @ last, np.zeros((2, 1))]))
    return {
        "scale_end_to_end_pct": 100 * scale_change(al.transforms, zs[0], zs[-1]),
        "scale_drift_pct": 100 * scale,
        "shear_drift_pct": 100 * shear,
    }


def symmetry(feats: list) -> tuple[float, float]:
    """Largest |scale - 1| and corner distance (px) of forward ∘ backward over neighbour pairs."""
    shape = feats[0].shape_yx
    scales, corners = [], []
    for z in range(len(feats) - 1):
        fwd = match_features(feats[z], feats[z + 1], z_a=z, z_b=z + 1)
        bwd = match_features(feats[z + 1], feats[z], z_a=z + 1, z_b=z)
        cycle = compose(fwd.matrix_array, bwd.matrix_array)
        scales.append(abs(np.sqrt(np.linalg.det(cycle[:, :2])) - 1))
        corners.append(corner_error_px(cycle, np.eye(2, 3), shape))
    return max(scales), max(corners)


def _footprints(feats: list) -> dict:
    """z -> footprint pose (trend removal follows the content, not the canvas)."""
    return {z: footprint_pose(f.area, f.area_factor) for z, f in enumerate(feats)}


def _summary(al) -> str:
    s = al.pair_summary()
    return ", ".join(
        f"{k} {v['matched']}/{sum(v.values())}" for k, v in s.items() if sum(v.values())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="3,4,5")
    ap.add_argument("--lams", default=str(DEFAULT_REGULARISATION))
    ap.add_argument("--detrends", default="rigid,none")
    ap.add_argument("--cropped", action="store_true", help="also misplace with content lost")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lams = [float(v) for v in args.lams.split(",")]
    detrends = args.detrends.split(",")
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        for name in ("VNC", "ISBI"):
            stack = load(name)
            shape = stack.shape[1:]
            n = len(stack)
            feats, bad = slice_features(stack, map_=ex.map)
            pairs = match_pairs(feats, bad, map_=ex.map)
            feet = _footprints(feats)
            runs = {}
            for seed in seeds:
                for keep in (True, False) if args.cropped else (True,):
                    warped, warps = warp_stack(stack, seed=seed, keep_content=keep)
                    f, b = slice_features(warped, map_=ex.map)
                    runs[(seed, keep, False)] = (
                        warps,
                        b,
                        match_pairs(f, b, map_=ex.map),
                        _footprints(f),
                    )
                    if name == "VNC" and keep:
                        broken = insert_bad_slices(warped, BAD, seed=seed)
                        nf, nb = slice_features([broken[z] for z in BAD], map_=ex.map)
                        f2 = list(f)
                        b2 = dict(b)
                        for i, z in enumerate(BAD):
                            f2[z] = nf[i]
                            if i in nb:
                                b2[z] = nb[i]
                        runs[(seed, keep, True)] = (
                            warps,
                            b2,
                            match_pairs(f2, b2, map_=ex.map),
                            _footprints(f2),
                        )
            sym = symmetry(feats)
            print(f"\n## {name} ({n} × {shape[0]}², {time.perf_counter() - t0:.0f} s)\n")
            print(
                f"direction symmetry (forward ∘ backward, every neighbour pair): "
                f"scale {100 * sym[0]:.3f} %, corners {sym[1]:.2f} px\n"
            )
            print("| λ | detrend | registered: pairs | scale e2e % | scale/shear drift % | "
                  "frame slice (cropped) / union | "
                  "robustness px (median / max) per seed | blank + noise |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|")
            for lam, det in ((lam, det) for lam in lams for det in detrends):
                kw = {"regularisation": lam, "detrend": det}
                ref = solve(pairs, range(n), shape, bad_slices=bad, footprints=feet, **kw)
                union = solve(
                    pairs, range(n), shape, bad_slices=bad, footprints=feet, frame="union", **kw
                )
                crop = 100 * max(ref.cropped.values(), default=0.0)
                d = drift(ref)
                rob, broken = [], []
                for (_seed, keep, with_bad), (warps, b, p, ft) in sorted(runs.items()):
                    al = solve(p, range(n), shape, bad_slices=b, footprints=ft, **kw)
                    med, worst, _ = robustness_px(
                        ref.transforms,
                        al.transforms,
                        warps,
                        shape,
                        skip=list(BAD) if with_bad else (),
                    )
                    tag = f"{med:.2f} / {worst:.2f}" + ("" if keep else " (cropped)")
                    (broken if with_bad else rob).append(tag)
                print(
                    f"| {lam:g} | {det} | {_summary(ref)} | {d['scale_end_to_end_pct']:.2f} | "
                    f"{d['scale_drift_pct']:.2f} / {d['shear_drift_pct']:.2f} | "
                    f"{ref.frame_shape_yx[1]} × {ref.frame_shape_yx[0]} (crops ≤ {crop:.1f} %) / "
                    f"{union.frame_shape_yx[1]} × {union.frame_shape_yx[0]} | {'; '.join(rob)} | "
                    f"{'; '.join(broken) or '–'} |"
                )


if __name__ == "__main__":
    main()
