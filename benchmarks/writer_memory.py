"""The memory model's writer term, measured: what one unit's writes add to a process's RSS.

Writes ``--blocks`` blocks of z × y × x voxels (random values, i.e. nearly incompressible:
the worst case for the encoded buffers) to level 0 of emflow's two benchmark outputs (JPEG q90
sharded precomputed + zstd-1 sharded OME-Zarr 0.5), through emflow's own writers, one block
after the other, in a fresh process per mode:

* ``reference``: what emflow does (tensorstore encodes the chunks from the block itself);
* ``copy``: the write copies the block into tensorstore's chunk buffers first (emflow before
  2026-12-02).

    python -m benchmarks.writer_memory --shape 128,1024,1024 --blocks 4

Prints one JSON line per mode: RSS above the block (MB, = the writer term), that term per
output voxel (plan.py plans 1.3), minor page faults, user and sys CPU-s, and whether the
OME-Zarr level 0 reads back equal to the blocks written.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = {
    "source": {"glob": "/nonexistent/*.png"},
    "voxel_size_nm": [8, 8, 8],
    "align": False,
    "enhance": {"clip_limit": 0},
    "outputs": [
        {"format": "precomputed", "name": "precomputed", "encoding": "jpeg", "jpeg_quality": 90},
        {"format": "omezarr", "name": "omezarr", "version": "0.5", "codec": "zstd"},
    ],
}


def measure(shape: tuple[int, int, int], blocks: int, reference: bool) -> dict:
    """Write ``blocks`` blocks of ``shape`` to both outputs in this process; figures."""
    import numpy as np
    import psutil

    from emflow.plan import make_writers, plan_output
    from emflow.recipe import recipe_from_dict

    nz, ny, nx = shape
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        recipe = recipe_from_dict({**RECIPE, "output_dir": tmp})
        plan = plan_output(recipe, nz, (ny, nx * blocks), "uint8")
        for o in recipe.outputs:
            (Path(tmp) / f"{o.name}.partial").mkdir()
        writers = make_writers(recipe, plan, tmp, token="wm")
        for w in writers:
            w.create()
        block = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        rss0 = psutil.Process().memory_info().rss
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(blocks):
            futs = []
            for w in writers:
                if reference:
                    futs.append(w.write(0, (0, 0, i * nx), block))
                else:  # the same region, written from a copy tensorstore makes itself
                    store = w._store(0)
                    if w.__class__.__name__ == "PrecomputedWriter":
                        region = store[i * nx : (i + 1) * nx, 0:ny, 0:nz, 0]
                        futs.append(region.write(block.transpose(2, 1, 0)))
                    else:
                        futs.append(store[0:nz, 0:ny, i * nx : (i + 1) * nx].write(block))
            for f in futs:
                f.result()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = r1.ru_maxrss * 1024  # kB on Linux
        # the lossless output read back: both modes must store the same voxels
        zarr = next(w for w in writers if w.__class__.__name__ == "OmeZarrWriter")._store(0)
        stored_equal = all(
            np.array_equal(zarr[0:nz, 0:ny, i * nx : (i + 1) * nx].read().result(), block)
            for i in range(blocks)
        )
    above = max(0, peak - rss0)
    return {
        "mode": "reference" if reference else "copy",
        "shape_zyx": list(shape),
        "blocks": blocks,
        "writer_mb": round(above / 1e6, 1),
        "per_output_voxel": round(above / (2 * block.size), 3),
        "minflt": r1.ru_minflt - r0.ru_minflt,
        "user_s": round(r1.ru_utime - r0.ru_utime, 3),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 3),
        "stored_equal": stored_equal,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="128,1024,1024", help="block z,y,x voxels")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--mode", choices=("reference", "copy", "both"), default="both")
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    if a.mode != "both":
        print(json.dumps(measure(shape, a.blocks, a.mode == "reference")), flush=True)
        return 0
    for mode in ("reference", "copy"):  # a fresh process each: peak RSS is per process
        cmd = [sys.executable, "-m", "benchmarks.writer_memory", "--shape", a.shape]
        subprocess.run([*cmd, "--blocks", str(a.blocks), "--mode", mode], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
