"""Neuroglancer precomputed writer (raw or JPEG chunks, optionally sharded), via tensorstore.

Voxel ``i`` of level ``k`` covers ``[i, i+1) * resolution_k`` nm (corner-based),
i.e. its centre is at ``(i + 0.5) * resolution_k``. Scales are keyed like
``4_4_40`` (resolution in nm). Chunk files keep their exact names (no ``.gz``).

On an object store (``path`` an s3:// or gs:// URL) nothing is renamed: chunks are
written first with the metadata assumed, and ``info`` is published last, in one PUT, by
:meth:`PrecomputedWriter.finalize` -- until then no reader sees a volume there.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from emflow.geometry import ShardLayout, ceil_div, shard_layout
from emflow.io import pagecache
from emflow.io.location import Location, is_url
from emflow.io.tsopen import context, open_store
from emflow.pyramid import Level

if TYPE_CHECKING:
    from emflow.recipe import PrecomputedOutput


@dataclass(frozen=True)
class PrecomputedSettings:
    """The output settings a :class:`PrecomputedWriter` uses, as plain values.

    A writer is pickled into every slab unit; holding the recipe's pydantic model instead would
    make each worker import pydantic and the recipe module (~0.1 CPU-s per worker process) only
    to unpickle it.
    """

    encoding: str  # "raw" | "jpeg"
    jpeg_quality: int
    sharded: bool
    chunk_size_xyz: tuple[int, int, int]
    shard_chunks_max: int

    @classmethod
    def of(cls, output: PrecomputedOutput | PrecomputedSettings | Any) -> PrecomputedSettings:
        """The settings of a recipe output (or settings already)."""
        if isinstance(output, cls):
            return output
        return cls(
            encoding=str(output.encoding),
            jpeg_quality=int(output.jpeg_quality),
            sharded=bool(output.sharded),
            chunk_size_xyz=tuple(int(v) for v in output.chunk_size_xyz),  # type: ignore[arg-type]
            shard_chunks_max=int(output.shard_chunks_max),
        )


@dataclass
class PrecomputedWriter:
    """Writes all levels of one precomputed volume; see :class:`emflow.io.writer.Writer`."""

    name: str
    path: Path
    config: PrecomputedSettings  # a recipe output (PrecomputedOutput) is turned into its settings
    levels: Sequence[Level]
    dtype: str
    cells: Sequence[
        Sequence[int | None]
    ]  # per level: (z, y, x) box one unit owns, None = whole axis
    token: str = ""
    shards: list[ShardLayout | None] = field(default_factory=list)
    # level -> the scale's folder as tensorstore named it (files(): read once per level)
    _keys: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_url(self.path):
            self.path = Path(self.path)
        self.config = PrecomputedSettings.of(self.config)
        cx, cy, cz = self.config.chunk_size_xyz
        self.shards = []
        for lev, cell in zip(self.levels, self.cells, strict=True):
            if not self.config.sharded:
                self.shards.append(None)
                continue
            z, y, x = lev.shape_zyx
            cz_, cy_, cx_ = (
                None if c is None else max(1, c // k)
                for c, k in zip(cell, (cz, cy, cx), strict=True)
            )
            self.shards.append(
                shard_layout(
                    (x, y, z),
                    (cx, cy, cz),
                    max_chunks=self.config.shard_chunks_max,
                    cell_chunks_xyz=(cx_, cy_, cz_),
                )
            )

    def _scale_metadata(self, k: int) -> dict:
        lev = self.levels[k]
        z, y, x = lev.shape_zyx
        rz, ry, rx = lev.voxel_size_nm_zyx
        md: dict = {
            "size": [x, y, z],
            "resolution": [rx, ry, rz],
            "voxel_offset": [0, 0, 0],
            "chunk_size": list(self.config.chunk_size_xyz),
            "encoding": self.config.encoding,
        }
        if self.config.encoding == "jpeg":
            md["jpeg_quality"] = self.config.jpeg_quality
        shard = self.shards[k]
        if shard is not None:
            md["sharding"] = shard.spec(data_encoding="raw")
        return md

    @property
    def remote(self) -> bool:
        """True on an object store: metadata is published last (no rename there)."""
        return is_url(self.path)

    def _spec(self, k: int) -> dict:
        if self.remote:
            return self._create_spec(k, Location.of(self.path).kvstore)
        return {
            "driver": "neuroglancer_precomputed",
            "kvstore": Location.of(self.path).kvstore,
            "scale_index": k,
        }

    def _create_spec(self, k: int, kvstore: dict) -> dict:
        return {
            "driver": "neuroglancer_precomputed",
            "kvstore": kvstore,
            "multiscale_metadata": {"type": "image", "data_type": self.dtype, "num_channels": 1},
            "scale_metadata": self._scale_metadata(k),
        }

    def create(self) -> None:
        if self.remote:  # nothing until finalize(): chunks are written with assumed metadata
            return
        # the folder is made (empty, with emflow's ownership marker) by emflow.finalize.claim_outputs;
        # a writer never deletes a folder (emflow.io.ownership decides what may be replaced)
        self.path.mkdir(parents=True, exist_ok=True)
        for k in range(len(self.levels)):
            spec = self._create_spec(k, Location.of(self.path).kvstore)
            ts.open(spec, create=True, context=context()).result()

    def storage_zyx(self, level: int) -> tuple[int, int, int]:
        cx, cy, cz = self.config.chunk_size_xyz
        shard = self.shards[level]
        if shard is None:
            return cz, cy, cx
        sx, sy, sz = shard.shard_chunks_xyz
        return cz * sz, cy * sy, cx * sx

    def _store(self, level: int) -> ts.TensorStore:
        return open_store(self._spec(level), token=self.token, assume_metadata=self.remote)

    def _write_store(self, level: int) -> ts.TensorStore:
        """The store a unit writes level ``level`` through.

        Where the level is smaller than one chunk along an axis (a stack thinner than the chunk
        depth), every chunk is cut by the volume's edge there, and tensorstore merges a write
        that covers only the in-bounds part of a chunk into a fill-value copy of the whole
        chunk, element by element (its out-of-bounds part counts as unwritten). That axis then
        gets a chunk as large as the level: the same chunk grid (one chunk along it), the same
        chunk ids and names and the same encoded bytes (edge chunks are stored clipped to the
        volume), and each write covers whole chunks. Metadata is assumed, never written.
        """
        md = self._scale_metadata(level)
        clipped = [min(c, n) for c, n in zip(md["chunk_size"], md["size"], strict=True)]
        if clipped == md["chunk_size"]:
            return self._store(level)
        spec = self._create_spec(level, Location.of(self.path).kvstore)
        spec["scale_metadata"]["chunk_size"] = clipped
        return open_store(spec, token=self.token, assume_metadata=True)

    def write(
        self, level: int, origin_zyx: tuple[int, int, int], block_zyx: np.ndarray
    ) -> ts.WriteFutures:
        store = self._write_store(level)
        (z0, y0, x0), (nz, ny, nx) = origin_zyx, block_zyx.shape
        # a view, not a copy: (z, y, x) C-order memory is x-fastest, the chunk layout of precomputed
        region = store[x0 : x0 + nx, y0 : y0 + ny, z0 : z0 + nz, 0]
        # chunks are encoded from the block itself, not from a copy (see Writer.write)
        future = region.write(
            block_zyx.transpose(2, 1, 0), can_reference_source_data_indefinitely=True
        )
        # durable once done (fsynced): its pages may go to the next writes (emflow.io.pagecache)
        return pagecache.drop_when_done(self, future, level, origin_zyx, block_zyx.shape)

    def files(
        self, level: int, origin_zyx: tuple[int, int, int], shape_zyx: tuple[int, ...]
    ) -> list[Path]:
        """The files (shards, or chunks when unsharded) a block of ``level`` at ``origin_zyx``
        is stored in (local volumes)."""
        md = self._scale_metadata(level)
        size, chunk = md["size"], md["chunk_size"]
        lo = origin_zyx[::-1]
        hi = [o + n for o, n in zip(lo, shape_zyx[::-1], strict=True)]
        ranges = [range(a // c, ceil_div(b, c)) for a, b, c in zip(lo, hi, chunk, strict=True)]
        base = Path(self.path) / self._key(level)
        shard = self.shards[level]
        if shard is None:
            return [
                base / "_".join(f"{i * c}-{min((i + 1) * c, n)}" for i, c, n in zip(g, chunk, size))
                for g in itertools.product(*ranges)
            ]
        grid_bits = [_bits(ceil_div(n, c)) for n, c in zip(size, chunk, strict=True)]
        shift = shard.preshift_bits + shard.minishard_bits
        mask = (1 << shard.shard_bits) - 1
        width = ceil_div(shard.shard_bits, 4)
        numbers = {(_morton(g, grid_bits) >> shift) & mask for g in itertools.product(*ranges)}
        return [base / f"{s:0{width}x}.shard" for s in sorted(numbers)]

    def _key(self, level: int) -> str:
        """The scale's key (its folder), as tensorstore named it from the resolution."""
        if level not in self._keys:
            spec = self._store(level).spec(minimal_spec=False).to_json()
            self._keys[level] = spec["scale_metadata"]["key"]
        return self._keys[level]

    def finalize(self) -> None:
        """Locally nothing to add: ``info`` is complete from the start (the ``.partial`` folder
        is renamed). On an object store: publish ``info`` now, in one PUT -- built by creating
        the scales in memory, exactly as a local run creates them (same bytes)."""
        if not self.remote:
            return
        ctx = ts.Context()
        for k in range(len(self.levels)):
            spec = self._create_spec(k, {"driver": "memory", "path": "v/"})
            ts.open(spec, create=True, open=True, context=ctx).result()
        memory = ts.KvStore.open({"driver": "memory", "path": "v/"}, context=ctx).result()
        Location.of(self.path).write("info", bytes(memory.read("info").result().value))


def _bits(n: int) -> int:
    """Bits of a compressed Morton code along an axis of ``n`` chunks."""
    return (n - 1).bit_length()


def _morton(grid_xyz: Sequence[int], bits_xyz: Sequence[int]) -> int:
    """Neuroglancer's compressed Morton code of a chunk (bit i of x, y, z in turn, each axis
    only while it has bits)."""
    code, j = 0, 0
    for i in range(max(bits_xyz)):
        for d in range(3):
            if i < bits_xyz[d]:
                code |= ((grid_xyz[d] >> i) & 1) << j
                j += 1
    return code
