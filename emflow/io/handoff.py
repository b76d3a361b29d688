"""Integer sums of one pyramid level, handed from one pass to the next.

A pass whose units cannot own the next level hands it the sums of level-0 voxels per
voxel of that level (counts follow from geometry, :func:`emflow.pyramid.axis_counts`),
so the next pass rounds every level once from exact sums. Stored in the run folder as
a Zarr v3 array (zstd-1) whose chunks are the handing units' images, so each unit
writes whole chunks. Deleted when the run completes. For a remote output_dir ``path`` is
a URL in the bucket's run folder (workers have no shared disk).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from emflow.io.location import Location, is_url, remove_tree
from emflow.io.tsopen import context, open_store


@dataclass
class HandoffArray:
    """(z, y, x) integer sums of one level."""

    path: Path | str  # a local folder, or a URL (remote run folder)
    shape_zyx: tuple[int, int, int]
    dtype: str
    chunk_zyx: tuple[int, int, int] | None = None
    token: str = ""

    def _spec(self) -> dict:
        return {"driver": "zarr3", "kvstore": Location.of(self.path).kvstore}

    def exists(self) -> bool:
        """True when the array's metadata is there (it was created)."""
        if is_url(self.path):
            return Location.of(self.path).exists("zarr.json")
        return Path(self.path).exists()

    def create(self) -> None:
        if is_url(self.path):
            from emflow.io import runmirror

            runmirror.flush_all()  # the bucket's run folder must stop vouching for it first
            remove_tree(self.path)
        elif Path(self.path).exists():
            shutil.rmtree(self.path)
        z, y, x = self.shape_zyx
        chunk = list(self.chunk_zyx) if self.chunk_zyx is not None else [1, y, x]
        chunk = [max(1, min(c, n)) for c, n in zip(chunk, (z, y, x), strict=True)]
        spec = self._spec()
        spec["metadata"] = {
            "shape": [z, y, x],
            "data_type": self.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1}},
            ],
            "fill_value": 0,
        }
        ts.open(spec, create=True, context=context()).result()

    def write(self, origin_zyx: tuple[int, int, int], block: np.ndarray) -> ts.WriteFutures:
        """Start writing ``block`` at ``origin_zyx``; ``.result()`` waits for the disk."""
        store = open_store(self._spec(), token=self.token)
        (z0, y0, x0), (nz, ny, nx) = origin_zyx, block.shape
        region = store[z0 : z0 + nz, y0 : y0 + ny, x0 : x0 + nx]
        return region.write(block, can_reference_source_data_indefinitely=True)  # no copy

    def read(self, box: tuple[int, int, int, int, int, int]) -> np.ndarray:
        """The sums of ``box`` = (z0, z1, y0, y1, x0, x1)."""
        store = open_store(self._spec(), token=self.token)
        z0, z1, y0, y1, x0, x1 = box
        return np.asarray(store[z0:z1, y0:y1, x0:x1].read().result())
