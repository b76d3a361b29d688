"""A lossless scratch copy of one pyramid level, handed from one pass to the next.

Stored in the run folder as a Zarr v3 array with one chunk per z plane (zstd-1),
so blocks of any depth own whole chunks. Deleted when the run completes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from emflow.io.tsopen import context, open_store


@dataclass
class HandoffArray:
    """(z, y, x) scratch array of one level."""

    path: Path
    shape_zyx: tuple[int, int, int]
    dtype: str
    token: str = ""

    def _spec(self) -> dict:
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path) + "/"}}

    def create(self) -> None:
        if Path(self.path).exists():
            shutil.rmtree(self.path)
        z, y, x = self.shape_zyx
        spec = self._spec()
        spec["metadata"] = {
            "shape": [z, y, x],
            "data_type": self.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, y, x]}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1}},
            ],
            "fill_value": 0,
        }
        ts.open(spec, create=True, context=context()).result()

    def write(self, z0: int, block: np.ndarray) -> ts.WriteFutures:
        """Start writing frames [z0, z0 + len(block)); ``.result()`` waits for the disk."""
        store = open_store(self._spec(), token=self.token)
        return store[z0 : z0 + block.shape[0]].write(block)

    def read(self, z0: int, z1: int) -> np.ndarray:
        store = open_store(self._spec(), token=self.token)
        return np.asarray(store[z0:z1].read().result())
