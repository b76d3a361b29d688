"""Large benchmark stacks: uncompressed uint8 TIFF slices of 4096² to 16384² (GBs), cached.

Slices are mosaics of 4096² tiles from a pool of synthetic EM slices
(``emflow.testing.synthetic_slices``), each tile picked and flipped by its position so no
two neighbouring tiles or consecutive slices repeat: EM texture everywhere (what JPEG and
zstd costs depend on) without generating gigapixels of Voronoi cells. Written outside the
repository (default ``/work/bench-data``, or ``$EMFLOW_BENCH_DATA``).

    python -m benchmarks.bigdata 64 8192 8192      # prints the folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 4096
POOL = 48


def data_root() -> Path:
    return Path(os.environ.get("EMFLOW_BENCH_DATA", "/work/bench-data"))


def stack_dir(shape_zyx: tuple[int, int, int]) -> Path:
    z, y, x = shape_zyx
    return data_root() / f"tiff-{z}x{y}x{x}"


def _pool(size: int) -> list[np.ndarray]:
    from emflow.testing import synthetic_slices

    return list(synthetic_slices((POOL, size, size), seed=7))


def _slice(pool: list[np.ndarray], z: int, ny: int, nx: int, tile: int) -> np.ndarray:
    out = np.empty((ny, nx), np.uint8)
    for ty in range(-(-ny // tile)):
        for tx in range(-(-nx // tile)):
            k = (z * 7 + ty * 13 + tx * 5) % len(pool)
            t = pool[k]
            if (ty + tx) % 2:
                t = t[::-1]
            if (ty * 3 + tx + z) % 3 == 1:
                t = t[:, ::-1]
            y0, x0 = ty * tile, tx * tile
            h, w = min(tile, ny - y0), min(tile, nx - x0)
            out[y0 : y0 + h, x0 : x0 + w] = t[:h, :w]
    return out


def ensure_tiff_stack(shape_zyx: tuple[int, int, int]) -> Path:
    """Write (once) an uncompressed uint8 TIFF stack of this shape; return its folder."""
    import tifffile

    d = stack_dir(shape_zyx)
    marker = d / "complete.json"
    if marker.exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    nz, ny, nx = shape_zyx
    tile = min(TILE, ny, nx)
    pool = _pool(tile)
    for z in range(nz):
        tifffile.imwrite(d / f"img{z:05d}.tif", _slice(pool, z, ny, nx, tile))
    marker.write_text(json.dumps({"shape_zyx": list(shape_zyx)}))
    return d


def cached_fraction(folder: Path) -> float | None:
    """Share of the folder's TIFF bytes in the page cache (util-linux ``fincore``), or None."""
    files = sorted(str(f) for f in folder.glob("*.tif"))
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    size = sum(s for _, s in pairs)
    return min(1.0, sum(r for r, _ in pairs) / size) if size else None  # RES counts whole pages


def warm(folder: Path) -> dict:
    """Read every TIFF of the folder once (untimed by the caller), so a run reads its input
    from the page cache, as the 2048² benchmark's repeated runs do: the derived limit counts a
    TIFF read at memcpy cost. Returns the share cached before, the bytes and the seconds."""
    before = cached_fraction(folder)
    buf = bytearray(8 << 20)
    total, t0 = 0, time.perf_counter()
    for f in sorted(folder.glob("*.tif")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return {"cached_before": before, "bytes": total, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("z", type=int)
    p.add_argument("y", type=int)
    p.add_argument("x", type=int)
    a = p.parse_args(argv)
    print(ensure_tiff_stack((a.z, a.y, a.x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
