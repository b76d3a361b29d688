"""The Writer protocol every output format implements.

A writer is created once by the driver (``create``: metadata and empty arrays),
pickled to workers, and used there to write blocks (whole storage objects) of one level
(``write``); the driver calls ``finalize`` after every block is written. The
pipeline guarantees that a block covers whole storage objects (chunks or shards)
of that level, so writes never overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class WriteFuture(Protocol):
    """A pending write (a tensorstore future): ``result()`` waits until it is on disk."""

    def result(self) -> object: ...


class Writer(Protocol):
    """One output volume (all levels) in one format."""

    name: str
    path: Path

    def create(self) -> None:
        """Write metadata and create every level inside ``path``.

        ``path`` already exists, empty but for emflow's ownership marker
        (:mod:`emflow.io.ownership`); a writer never deletes anything.
        """

    def storage_zyx(self, level: int) -> tuple[int, int, int]:
        """(z, y, x) extent in level voxels of this level's storage objects (chunk or shard)."""

    def write(
        self, level: int, origin_zyx: tuple[int, int, int], block_zyx: np.ndarray
    ) -> WriteFuture:
        """Start writing a block of ``level`` at ``origin_zyx`` (level voxels).

        Returns a future: the bytes are durable once ``.result()`` returned. Chunks are
        encoded from the block itself (tensorstore references it instead of copying it into
        chunk buffers: a unit's writes need no second copy of its levels), so the block must
        not be modified while any reference to it is held -- reuse it only once its
        reference count is back to the caller's own. Callers overlap encoding with their
        next computation.
        """

    def finalize(self) -> None:
        """Write the metadata that marks the volume complete."""
