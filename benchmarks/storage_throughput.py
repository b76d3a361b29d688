"""Write throughput to a local S3 server (moto) against local disk, through emflow's writers.

Writes the same (z, y, x) uint8 volume as a 3-level pyramid (neuroglancer precomputed,
sharded raw, and OME-Zarr 0.5, sharded zstd) with emflow's writers -- chunks unit by unit,
then ``finalize()`` (on S3: metadata published last) -- once to a local folder and once to
``s3://`` on moto's server running as its own process; the two variants alternate
(local, s3, local, s3, ...) so the ratio survives a loaded machine. Prints one JSON line
with the medians and the ratio s3 / local (> 1: S3 is slower).

    python -m benchmarks.storage_throughput                  # 128 x 1024 x 1024, 3 repeats
    python -m benchmarks.storage_throughput --shape 32 512 512 --repeat 1   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _volume(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """EM-like texture: smooth blobs plus noise (compresses like real sections, not like noise)."""
    z, y, x = shape_zyx
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    out = np.empty(shape_zyx, np.uint8)
    for k in range(z):
        base = 128 + 50 * np.sin(xx / (23 + k % 5)) * np.cos(yy / 31)
        out[k] = np.clip(base + rng.normal(0, 12, (y, x)), 0, 255).astype(np.uint8)
    return out


def _writers(root: str, data: np.ndarray, where: str):
    from emflow.plan import make_writers, plan_output
    from emflow.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "source": {"glob": "*.png"},
            "voxel_size_nm": [4, 4, 40],
            "output_dir": root if where == "local" else tempfile.gettempdir(),
            "outputs": [
                {"format": "precomputed", "name": "ng", "encoding": "raw", "sharded": True},
                {"format": "omezarr", "name": "zarr", "version": "0.5"},
            ],
            "pyramid": {"levels": 3},
            "align": False,
        }
    )
    plan = plan_output(recipe, data.shape[0], data.shape[1:], "uint8")
    writers = make_writers(recipe, plan, Path(root), token=f"{where}{time.monotonic_ns()}")
    if where != "local":
        writers = [dataclasses.replace(w, path=f"{root}/{w.name}") for w in writers]
    return plan, writers


def write_pyramid(root: str, data: np.ndarray, where: str) -> float:
    """Seconds to write ``data`` as both outputs under ``root`` (a folder or an s3:// URL)."""
    plan, writers = _writers(root, data, where)
    t0 = time.perf_counter()
    for w in writers:
        w.create()
        for lev in plan.levels:
            f = lev.factor_zyx
            vol = data[:: f[0], :: f[1], :: f[2]][
                : lev.shape_zyx[0], : lev.shape_zyx[1], : lev.shape_zyx[2]
            ]
            step = w.storage_zyx(lev.index)[0]  # whole shards in z, as units write them
            pending = []
            for z0 in range(0, vol.shape[0], step):
                pending.append(
                    w.write(lev.index, (z0, 0, 0), np.ascontiguousarray(vol[z0 : z0 + step]))
                )
                if len(pending) >= 2:
                    pending.pop(0).result()
            for p in pending:
                p.result()
        w.finalize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape", type=int, nargs=3, default=[128, 1024, 1024], metavar=("Z", "Y", "X")
    )
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scratch = Path(tempfile.mkdtemp(prefix="emflow-s3bench-"))
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline or moto.poll() is not None:
                raise SystemExit("moto's server did not start")
            time.sleep(0.1)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        import boto3

        from emflow.io import storage

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        storage.configure(storage.resolve(endpoint=endpoint))
    except BaseException:
        moto.kill()
        moto.wait(timeout=30)
        raise
    try:
        data = _volume(tuple(args.shape))
        times: dict[str, list[float]] = {"local": [], "s3": []}
        for i in range(args.repeat):
            for where in ("local", "s3"):
                if where == "local":
                    root = str(scratch / f"run{i}")
                else:
                    root = f"s3://bench/run{i}"
                times[where].append(write_pyramid(root, data, where))
                shutil.rmtree(scratch / f"run{i}", ignore_errors=True)
                print(f"{where} run {i}: {times[where][-1]:.2f} s", file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "shape_zyx": args.shape,
            "bytes": int(data.nbytes),
            "local_s": [round(t, 3) for t in times["local"]],
            "s3_s": [round(t, 3) for t in times["s3"]],
            "median_local_s": round(med["local"], 3),
            "median_s3_s": round(med["s3"], 3),
            "ratio_s3_over_local": round(med["s3"] / med["local"], 2),
            "load1": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result))
        return result
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=30)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
