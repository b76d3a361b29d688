"""The benchmark stack: synthetic EM slices written as PNGs with emflow.testing, cached."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def texture_version() -> str:
    """Short hash of emflow.testing's texture code: a changed texture gets a new cache dir."""
    import hashlib
    import inspect

    import emflow.testing as testing

    mod = inspect.getmodule(testing.synthetic_slices)
    return hashlib.sha256(inspect.getsource(mod).encode()).hexdigest()[:8]


def stack_dir(shape_zyx: tuple[int, int, int], seed: int = 0) -> Path:
    """Cache folder of a PNG stack: ``$EMFLOW_BENCH_DATA`` (outside the repository) if set."""
    z, y, x = shape_zyx
    root = (
        Path(os.environ["EMFLOW_BENCH_DATA"]) if "EMFLOW_BENCH_DATA" in os.environ else OUT / "data"
    )
    return root / f"png-{z}x{y}x{x}-seed{seed}-{texture_version()}"


def ensure_png_stack(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[Path, list[Path]]:
    """Write (once) the PNG stack of ``synthetic_slices(shape_zyx, seed)``; return (dir, paths)."""
    from emflow.testing import synthetic_slices, write_stack

    d = stack_dir(shape_zyx, seed)
    marker = d / "complete.json"
    if marker.exists():
        paths = [d / p for p in json.loads(marker.read_text())["files"]]
        if all(p.exists() for p in paths):
            return d, paths
    shutil.rmtree(d, ignore_errors=True)
    paths = write_stack(synthetic_slices(shape_zyx, seed=seed), d, pattern="img%05d.png")
    marker.write_text(
        json.dumps({"shape_zyx": list(shape_zyx), "seed": seed, "files": [p.name for p in paths]})
    )
    return d, paths


def read_stack(paths: list[Path], threads: int = 2) -> np.ndarray:
    """Decode PNG slices into one (z, y, x) uint8 array (cv2, in threads)."""
    first = cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED)
    vol = np.empty((len(paths), *first.shape), dtype=first.dtype)
    vol[0] = first

    def load(i: int) -> None:
        vol[i] = cv2.imread(str(paths[i]), cv2.IMREAD_UNCHANGED)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(load, range(1, len(paths))))
    return vol
