"""Shared by the peer scripts (standalone: imported by path inside each peer's venv)."""

import json
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


def report(**fields):
    print(json.dumps(fields))


now = time.perf_counter
