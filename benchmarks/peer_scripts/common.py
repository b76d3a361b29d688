"""Shared by the peer scripts (standalone: imported by path inside each peer's venv)."""

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np


def decode_stack(src, threads=2):
    """cv2 decode of every PNG in ``src`` into one (z, y, x) array, ``threads`` threads."""
    cv2.setNumThreads(1)
    paths = sorted(str(p) for p in Path(src).glob("*.png"))
    first = cv2.imread(paths[0], cv2.IMREAD_UNCHANGED)
    vol = np.empty((len(paths), *first.shape), first.dtype)
    vol[0] = first

    def load(i):
        vol[i] = cv2.imread(paths[i], cv2.IMREAD_UNCHANGED)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(load, range(1, len(paths))))
    return vol


def peer_args(*, workers_flag="--threads", extra=()):
    """Arguments every peer script takes: SRC OUT, worker count, levels, voxel size, ``extra``."""
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument(workers_flag, type=int, default=2)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--voxel-nm", type=float, default=8.0)
    for flag, kind, default in extra:
        p.add_argument(flag, type=kind, default=default)
    return p.parse_args()


def fresh_dir(path):
    """An empty output directory at ``path`` (resolved), replacing an earlier run's."""
    out = Path(path).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def report(**fields):
    print(json.dumps(fields))


now = time.perf_counter
