"""Alignment front-end cost: seconds per slice per core, features + 1st/2nd-neighbour matching.

Per slice the pipeline computes features once and matches it to its 1st and 2nd neighbour,
so ``seconds per slice = features + 2 x match`` (one OpenCV thread, decode excluded).
Slices are real EM texture (the 1024^2 VNC sections tiled into a mosaic for larger sizes;
random smooth texture if the data are absent), each under a small random affine plus noise,
at default settings (:func:`choose_downsample`, nfeatures 4000, MatchConfig()).

Run ``python benchmarks/align_cost.py [sizes...]``; report ratios, not absolute limits
(the machine is shared).
"""

from __future__ import annotations

import glob
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from emflow.align.features import choose_downsample, compute_features
from emflow.align.match import MatchConfig, match_features
from emflow.align.warp import warp_slice
from emflow.testing.transforms import random_affines

VNC = str(Path(__file__).resolve().parents[2] / "shared/data/sstem-drosophila-vnc/stack1/raw/*.tif")


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8 EM texture: VNC sections tiled, or smoothed noise without data."""
    paths = sorted(glob.glob(VNC))
    if not paths:
        noise = rng.normal(128, 60, (size, size)).astype(np.float32)
        return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0), 1, 255).astype(np.uint8)
    import tifffile

    tiles = [tifffile.imread(p) for p in paths]
    t = tiles[0].shape[0]
    n = -(-size // t)
    rows = [np.hstack([tiles[(i * n + j) % len(tiles)] for j in range(n)]) for i in range(n)]
    return np.vstack(rows)[:size, :size]


def measure_details(
    sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 3
) -> dict[int, dict[str, Any]]:
    """Per size: features and match seconds (median of ``repeats``), keypoints, factor, total."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    out: dict[int, dict[str, Any]] = {}
    for size in sizes:
        base = _texture(int(size), rng)
        shape = base.shape
        mats = random_affines(
            3,
            max_translation_px=20,
            max_rotation_deg=0.5,
            max_scale_shear=0.002,
            seed=1,
            shape_yx=shape,
        )
        slices = []
        for m in mats:
            w = warp_slice(base, m, (0, 0), shape).astype(np.float32)
            noisy = np.clip(np.rint(w + rng.normal(0, 8, shape)), 1, 255).astype(np.uint8)
            slices.append(np.where(w > 0, noisy, 0).astype(np.uint8))
        t_feat, t_match = [], []
        feats = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            feats = [compute_features(s) for s in slices]
            t_feat.append((time.perf_counter() - t0) / len(slices))
            t0 = time.perf_counter()
            pairs = [
                match_features(feats[a], feats[b], z_a=a, z_b=b, config=MatchConfig())
                for a, b in ((0, 1), (1, 2), (0, 2))
            ]
            t_match.append((time.perf_counter() - t0) / 3)
        f, m = float(np.median(t_feat)), float(np.median(t_match))
        out[int(size)] = {
            "seconds_per_slice_per_core": f + 2 * m,
            "features_s": f,
            "match_s": m,
            "downsample": choose_downsample(shape),
            "keypoints": int(np.mean([len(x) for x in feats])),
            "pairs_ok": int(sum(p.ok for p in pairs)),
        }
    return out


if __name__ == "__main__":
    sizes = tuple(int(a) for a in sys.argv[1:]) or (1024, 2048, 4096)
    for s, d in measure_details(sizes).items():
        print(
            f"{s}^2: {d['seconds_per_slice_per_core']:.3f} s/slice/core "
            f"(features {d['features_s']:.3f} s, match {d['match_s']:.3f} s x 2; "
            f"downsample {d['downsample']}, {d['keypoints']} keypoints, {d['pairs_ok']}/3 pairs ok)"
        )
