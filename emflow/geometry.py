"""Integer geometry: slab cutting on chunk grids and neuroglancer shard layouts.

Pure integer arithmetic, no I/O. Ranges are half-open ``[start, stop)``; arrays
are (z, y, x); neuroglancer's own shapes are (x, y, z) and named ``*_xyz``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b) for positive b."""
    return -(-a // b)


def cut_slabs(n: int, depth: int) -> list[tuple[int, int]]:
    """Cut ``[0, n)`` into consecutive ``[z0, z1)`` runs of ``depth`` (the last may be shorter)."""
    if depth <= 0:
        raise ValueError("slab depth must be positive")
    return [(z0, min(z0 + depth, n)) for z0 in range(0, n, depth)]


def _bits(n: int) -> int:
    """Bits needed to number ``n`` items (0 for n <= 1)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


@dataclass(frozen=True)
class ShardLayout:
    """A neuroglancer ``neuroglancer_uint64_sharded_v1`` layout with an identity hash.

    ``shard_chunks_xyz`` is the box of chunks one shard file covers (in chunk units).
    """

    preshift_bits: int
    minishard_bits: int
    shard_bits: int
    shard_chunks_xyz: tuple[int, int, int]

    def spec(self, *, data_encoding: str = "raw") -> dict:
        return {
            "@type": "neuroglancer_uint64_sharded_v1",
            "hash": "identity",
            "preshift_bits": self.preshift_bits,
            "minishard_bits": self.minishard_bits,
            "shard_bits": self.shard_bits,
            "minishard_index_encoding": "gzip",
            "data_encoding": data_encoding,
        }


def shard_layout(
    size_xyz: Sequence[int],
    chunk_xyz: Sequence[int],
    *,
    max_chunks: int = 4096,
    max_z_chunks: int | None = None,
    cell_chunks_xyz: Sequence[int | None] | None = None,
) -> ShardLayout:
    """Choose a shard layout whose shards are boxes of at most ``max_chunks`` chunks.

    With an identity hash the low bits of a chunk's compressed Morton code select
    its place inside a shard; those bits go to x, y, z in turn (skipping axes whose
    chunk grid is exhausted), so the first ``b`` bits span a box of chunks. The box
    may be limited per axis (``cell_chunks_xyz``, None = unlimited; ``max_z_chunks``
    limits z alone): growth stops at the first bit that would exceed a limit, so a
    unit owning a cell of that many chunks owns whole shard files.
    """
    grid = [ceil_div(s, c) for s, c in zip(size_xyz, chunk_xyz, strict=True)]
    grid_bits = [_bits(g) for g in grid]
    total_bits = sum(grid_bits)
    limit = _floor_bits(max(1, max_chunks))
    caps: list[int | None] = [None, None, None]
    if cell_chunks_xyz is not None:
        caps = [None if c is None else _floor_bits(max(1, c)) for c in cell_chunks_xyz]
    if max_z_chunks is not None:
        z = _floor_bits(max(1, max_z_chunks))
        caps[2] = z if caps[2] is None else min(caps[2], z)
    used = [0, 0, 0]
    b = 0
    while b < min(limit, total_bits):
        placed = False
        for d in range(3):
            if b >= min(limit, total_bits):
                break
            if used[d] < grid_bits[d]:
                cap = caps[d]
                if cap is not None and used[d] >= cap:
                    # this axis may take no more bits; the Morton order would still assign
                    # the next bit to it, so the box stops growing here.
                    return _layout(used, b, total_bits)
                used[d] += 1
                b += 1
                placed = True
        if not placed:
            break
    return _layout(used, b, total_bits)


def _floor_bits(n: int) -> int:
    """floor(log2(n)) for n >= 1."""
    return n.bit_length() - 1


def _layout(used: list[int], b: int, total_bits: int) -> ShardLayout:
    minishard = min(3, b)
    return ShardLayout(
        preshift_bits=b - minishard,
        minishard_bits=minishard,
        shard_bits=total_bits - b,
        shard_chunks_xyz=(1 << used[0], 1 << used[1], 1 << used[2]),
    )
