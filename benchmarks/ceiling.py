"""The "ceiling" reference: a small hand-written tensorstore pyramid pipeline.

cv2 decode in N threads -> integer 2x2x2 means from level 0 (benchmarks.pyramid_ref,
rounded once) -> one tensorstore write per level, into neuroglancer precomputed JPEG q90
sharded and/or OME-Zarr 0.5 (zarr3 sharded, zstd-1), as in ../shared/notes/PERFORMANCE.md
§3 ("ts" rows). Whole stack in memory: for benchmark sizes only.

    python -m benchmarks.ceiling SRC_DIR OUT_DIR --formats jpeg,zarr --threads 2

Prints one JSON line with the phase timings.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import tensorstore as ts

from benchmarks.data import read_stack
from benchmarks.pyramid_ref import pyramid

CHUNK = 64
#: chunks per precomputed shard = 2**(PRESHIFT + MINISHARD) (1024 x 1024 x 128 voxels at L0)
PRESHIFT, MINISHARD = 6, 3
ZARR_SHARD_ZYX = (128, 1024, 1024)


def _morton_bits(grid_xyz: list[int]) -> int:
    return sum(max(0, math.ceil(math.log2(g))) for g in grid_xyz)


def precomputed_sharding(size_xyz: list[int], chunk: int = CHUNK) -> dict:
    """Identity-hash sharding spec with 2**(PRESHIFT+MINISHARD) chunks per shard."""
    total = _morton_bits([-(-s // chunk) for s in size_xyz])
    pre = min(PRESHIFT, total)
    mini = min(MINISHARD, total - pre)
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "hash": "identity",
        "preshift_bits": pre,
        "minishard_bits": mini,
        "shard_bits": total - pre - mini,
        "minishard_index_encoding": "gzip",
        "data_encoding": "raw",
    }


def _context(threads: int) -> ts.Context:
    return ts.Context(
        {
            "data_copy_concurrency": {"limit": threads},
            "file_io_concurrency": {"limit": max(8, threads)},
        }
    )


def write_precomputed(
    levels: list[np.ndarray], root: Path, voxel_nm: float, threads: int, quality: int = 90
) -> None:
    ctx = _context(threads)
    for lvl, vol in enumerate(levels):
        size = [vol.shape[2], vol.shape[1], vol.shape[0]]
        res = [voxel_nm * 2**lvl] * 3
        spec = {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(root) + "/"},
            "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
            "scale_metadata": {
                "key": f"{int(res[0])}_{int(res[1])}_{int(res[2])}",
                "size": size,
                "resolution": res,
                "encoding": "jpeg",
                "jpeg_quality": quality,
                "chunk_size": [CHUNK] * 3,
                "sharding": precomputed_sharding(size),
            },
            "open": True,
            "create": True,
        }
        store = ts.open(spec, context=ctx).result()
        store[:, :, :, 0].write(vol.transpose(2, 1, 0)).result()


def write_omezarr(
    levels: list[np.ndarray], root: Path, voxel_nm: float, threads: int, zstd_level: int = 1
) -> None:
    ctx = _context(threads)
    root.mkdir(parents=True, exist_ok=True)
    datasets = []
    for lvl, vol in enumerate(levels):
        shard = [
            min(s, -(-n // CHUNK) * CHUNK) for s, n in zip(ZARR_SHARD_ZYX, vol.shape, strict=True)
        ]
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": f"{root}/{lvl}/"},
            "metadata": {
                "shape": list(vol.shape),
                "data_type": "uint8",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
                "codecs": [
                    {
                        "name": "sharding_indexed",
                        "configuration": {
                            "chunk_shape": [CHUNK] * 3,
                            "codecs": [
                                {"name": "bytes"},
                                {"name": "zstd", "configuration": {"level": zstd_level}},
                            ],
                            "index_codecs": [
                                {"name": "bytes", "configuration": {"endian": "little"}},
                                {"name": "crc32c"},
                            ],
                        },
                    }
                ],
                "dimension_names": ["z", "y", "x"],
            },
            "create": True,
            "delete_existing": True,
        }
        store = ts.open(spec, context=ctx).result()
        store.write(vol).result()
        f = 2.0**lvl
        datasets.append(
            {
                "path": str(lvl),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [voxel_nm * f] * 3},
                    {"type": "translation", "translation": [voxel_nm * (f - 1) / 2] * 3},
                ],
            }
        )
    meta = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "ome": {
                "version": "0.5",
                "multiscales": [
                    {
                        "name": "ceiling",
                        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                        "datasets": datasets,
                    }
                ],
            }
        },
    }
    (root / "zarr.json").write_text(json.dumps(meta, indent=1))


def run(
    src: Path, out: Path, formats: list[str], threads: int, levels: int, voxel_nm: float
) -> dict:
    cv2.setNumThreads(1)
    paths = sorted(src.glob("*.png"))
    t0 = time.perf_counter()
    vol = read_stack(paths, threads)
    t1 = time.perf_counter()
    pyr = pyramid(vol, levels, threads=threads)
    t2 = time.perf_counter()
    timings = {"decode_s": t1 - t0, "downsample_s": t2 - t1}
    shutil.rmtree(out, ignore_errors=True)
    if "jpeg" in formats:
        tw = time.perf_counter()
        write_precomputed(pyr, out / "precomputed", voxel_nm, threads)
        timings["write_jpeg_s"] = time.perf_counter() - tw
    if "zarr" in formats:
        tw = time.perf_counter()
        write_omezarr(pyr, out / "image.ome.zarr", voxel_nm, threads)
        timings["write_zarr_s"] = time.perf_counter() - tw
    timings["total_s"] = time.perf_counter() - t0
    timings["input_bytes"] = int(vol.nbytes)
    return timings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--formats", default="jpeg,zarr")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--voxel-nm", type=float, default=8.0)
    a = p.parse_args(argv)
    print(json.dumps(run(a.src, a.out, a.formats.split(","), a.threads, a.levels, a.voxel_nm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
