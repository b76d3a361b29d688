"""Read a written pyramid back with tensorstore and compare it with the source.

Finds every neuroglancer precomputed volume (an ``info`` file) and OME-Zarr multiscale
image (zarr v3 ``zarr.json`` or v2 ``.zattrs`` with ``multiscales``) under a directory, so
the same check runs on emflow's, the ceiling's and the peers' outputs. Per level: the
factors come from the metadata (resolution / scale relative to level 0); the reference is
the float64 mean of the source blocks; bias = mean(stored - exact), max |err|, and at
level 0 bit-exactness and PSNR.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tensorstore as ts

from benchmarks.pyramid_ref import exact_means


def _find(root: Path) -> list[tuple[str, Path]]:
    found = []
    for info in sorted(root.rglob("info")):
        try:
            meta = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "scales" in meta:
            found.append(("precomputed", info.parent))
    for zj in sorted([*root.rglob("zarr.json"), *root.rglob(".zattrs")]):
        try:
            meta = json.loads(zj.read_text())
        except (OSError, ValueError):
            continue
        attrs = meta.get("attributes", meta) if zj.name == "zarr.json" else meta
        if "ome" in attrs and "multiscales" in attrs["ome"]:
            found.append(("omezarr", zj.parent))
        elif "multiscales" in attrs:
            found.append(("omezarr", zj.parent))
    return found


def _precomputed_levels(path: Path) -> list[tuple[np.ndarray, tuple[int, int, int], str]]:
    info = json.loads((path / "info").read_text())
    r0 = info["scales"][0]["resolution"]
    out = []
    for sc in info["scales"]:
        store = ts.open(
            {
                "driver": "neuroglancer_precomputed",
                "kvstore": {"driver": "file", "path": str(path) + "/"},
                "scale_metadata": {"key": sc["key"]},
            }
        ).result()
        # order="F" of (x, y, z) is C-order (z, y, x): a contiguous array after the transpose
        arr = store[..., 0].read(order="F").result().transpose(2, 1, 0)
        f = tuple(round(sc["resolution"][i] / r0[i]) for i in (2, 1, 0))
        out.append((arr, f, sc["encoding"]))
    return out


def _omezarr_levels(path: Path) -> list[tuple[np.ndarray, tuple[int, int, int], str]]:
    if (path / "zarr.json").exists():
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        ms = attrs.get("ome", attrs)["multiscales"][0]
        driver = "zarr3"
    else:
        ms = json.loads((path / ".zattrs").read_text())["multiscales"][0]
        driver = "zarr"
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["z", "y", "x"])]
    scales = []
    for ds in ms["datasets"]:
        sc = next(
            (t["scale"] for t in ds.get("coordinateTransformations", []) if t["type"] == "scale"),
            [1.0] * len(axes),
        )
        scales.append(sc)
    out = []
    for ds, sc in zip(ms["datasets"], scales, strict=True):
        store = ts.open(
            {"driver": driver, "kvstore": {"driver": "file", "path": f"{path}/{ds['path']}/"}}
        ).result()
        arr = store.read().result()
        # keep the spatial z, y, x axes; drop singleton t/c
        idx = tuple(slice(None) if a in "zyx" else 0 for a in axes)
        arr = arr[idx]
        f = tuple(round(sc[axes.index(a)] / scales[0][axes.index(a)]) for a in "zyx")
        codec = "zstd" if driver == "zarr3" else "zarr2"
        out.append((arr, f, codec))
    return out


_MEANS_CACHE: dict[tuple, np.ndarray] = {}


def _reference_means(source: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Exact float64 block means, from integer sums when f is 2^l in every axis; cached
    per source so every variant of a run compares against the same arrays."""
    key = (id(source), source.shape, f)
    if key not in _MEANS_CACHE:
        lvl = f[0].bit_length() - 1
        if (
            f[0] == f[1] == f[2]
            and f[0] == 1 << lvl
            and source.dtype == np.uint8
            and all(s % f[0] == 0 for s in source.shape)
        ):
            from benchmarks.pyramid_ref import pyramid_sums

            sums = pyramid_sums(source, lvl + 1)[-1]
            _MEANS_CACHE[key] = sums / float(f[0] ** 3)
        else:
            _MEANS_CACHE[key] = exact_means(source, f)
    return _MEANS_CACHE[key]


def compare(
    source: np.ndarray, levels: list[tuple[np.ndarray, tuple[int, int, int], str]]
) -> list[dict]:
    """Per-level figures vs the exact float64 block means of ``source`` (z, y, x)."""
    rows = []
    for lvl, (arr, f, enc) in enumerate(levels):
        if f == (1, 1, 1):
            shape = tuple(min(a, b) for a, b in zip(arr.shape, source.shape, strict=True))
            sl = tuple(slice(0, s) for s in shape)
            d = arr[sl].astype(np.int16) - source[sl].astype(np.int16)
            row = {
                "level": lvl,
                "factors_zyx": list(f),
                "shape_zyx": list(arr.shape),
                "expected_shape_zyx": list(source.shape),
                "encoding": enc,
                "bias": float(d.mean(dtype=np.float64)),
                "max_abs_err": float(np.abs(d).max()),
            }
            row["bit_exact"] = bool(arr.shape == source.shape and not d.any())
            mse = float(np.square(d, dtype=np.int32).mean(dtype=np.float64))
            row["psnr_db"] = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
            rows.append(row)
            continue
        ref = _reference_means(source, f)
        shape = tuple(min(a, b) for a, b in zip(arr.shape, ref.shape, strict=True))
        sl = tuple(slice(0, s) for s in shape)
        diff = arr[sl] - ref[sl]
        rows.append(
            {
                "level": lvl,
                "factors_zyx": list(f),
                "shape_zyx": list(arr.shape),
                "expected_shape_zyx": list(ref.shape),
                "encoding": enc,
                "bias": float(diff.mean()),
                "max_abs_err": float(np.abs(diff).max()),
            }
        )
    return rows


def check_tree(root: str | Path, source: np.ndarray) -> dict[str, list[dict]]:
    """Compare every pyramid found under ``root``; keys are ``"<kind> <relative path>"``."""
    root = Path(root)
    out: dict[str, list[dict]] = {}
    for kind, path in _find(root):
        try:
            levels = _precomputed_levels(path) if kind == "precomputed" else _omezarr_levels(path)
            out[f"{kind} {path.relative_to(root)}"] = compare(source, levels)
        except Exception as exc:  # a peer's odd layout must not stop the run
            out[f"{kind} {path.relative_to(root)}"] = [{"error": f"{type(exc).__name__}: {exc}"}]
    return out


def summarize(rows: list[dict]) -> dict:
    """Level-0 exactness/PSNR and the worst |bias| over levels >= 1."""
    if not rows or "error" in rows[0]:
        return {"error": rows[0]["error"] if rows else "no levels"}
    biases = [r["bias"] for r in rows[1:]]
    return {
        "levels": len(rows),
        "l0_bit_exact": rows[0]["bit_exact"],
        "l0_psnr_db": rows[0]["psnr_db"],
        "max_abs_bias": max((abs(b) for b in biases), default=0.0),
        "bias_per_level": [round(r["bias"], 4) for r in rows],
        "max_abs_err_per_level": [round(r["max_abs_err"], 2) for r in rows],
    }
