"""Peer: igneous + CloudVolume -> neuroglancer precomputed JPEG q90 (unsharded), 5 levels.

Runs inside benchmarks/.venvs/igneous (standalone: no emflow/benchmarks imports). As in
../shared/notes/PERFORMANCE.md §3: N processes each decode a z-slab of PNGs (cv2) and
upload it with CloudVolume ``parallel=1`` (``parallel>1`` misplaces chunks in 12.15.2);
then one ``create_downsampling_tasks(factor=(2,2,2), num_mips=1)`` call per mip (with only
128 slices a multi-mip task can make one mip), z chunk clipped to the level depth, run on
``LocalTaskQueue(parallel=N)``. ``encoding_level=90`` keeps every level at q90.

    python igneous_run.py SRC OUT --procs 2 --levels 5 --voxel-nm 8
"""

import argparse
import json
import shutil
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np


def _upload(args):
    url, paths, z0 = args
    from cloudvolume import CloudVolume

    cv2.setNumThreads(1)
    slab = np.stack([cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in paths])  # z, y, x
    vol = CloudVolume(url, parallel=1, progress=False, compress=False)
    vol[:, :, z0 : z0 + len(paths)] = np.ascontiguousarray(slab.transpose(2, 1, 0))
    return len(paths)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--voxel-nm", type=float, default=8.0)
    p.add_argument("--quality", type=int, default=90)
    a = p.parse_args()

    from cloudvolume import CloudVolume
    from igneous.task_creation import create_downsampling_tasks
    from taskqueue import LocalTaskQueue

    paths = sorted(str(x) for x in Path(a.src).glob("*.png"))
    first = cv2.imread(paths[0], cv2.IMREAD_UNCHANGED)
    ny, nx = first.shape
    nz = len(paths)
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    url = f"file://{out}/precomputed"
    t0 = time.perf_counter()
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="image",
        data_type="uint8",
        encoding="jpeg",
        resolution=[a.voxel_nm] * 3,
        voxel_offset=[0, 0, 0],
        chunk_size=[64, 64, 64],
        volume_size=[nx, ny, nz],
        encoding_level=a.quality,
    )
    vol = CloudVolume(url, info=info, compress=False)
    vol.commit_info()
    # slabs of whole 64-deep chunks, split over the processes
    step = max(64, -(-nz // a.procs // 64) * 64)
    jobs = [(url, paths[z : z + step], z) for z in range(0, nz, step)]
    with get_context("spawn").Pool(a.procs) as pool:
        pool.map(_upload, jobs)
    t1 = time.perf_counter()
    tq = LocalTaskQueue(parallel=a.procs, progress=False)
    zsize = nz
    for mip in range(a.levels - 1):
        zsize = -(-zsize // 2)
        tasks = create_downsampling_tasks(
            url,
            mip=mip,
            num_mips=1,
            factor=(2, 2, 2),
            compress=False,
            chunk_size=(64, 64, min(64, zsize)),
            encoding_level=a.quality,
        )
        tq.insert_all(tasks)
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "upload_s": t1 - t0,
                "downsample_s": t2 - t1,
                "total_s": t2 - t0,
                "input_bytes": nz * ny * nx,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
