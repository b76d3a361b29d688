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
) -> ShardLayout:
    """Choose a shard layout whose shards are boxes of at most ``max_chunks`` chunks.

    With an identity hash the low bits of a chunk's compressed Morton code select
    its place inside a shard; those bits go to x, y, z in turn (skipping axes whose
    chunk grid is exhausted), so the first ``b`` bits span a box of chunks. The box
    is limited to ``max_z_chunks`` chunks along z so that a slab of that depth owns
    whole shard files.
    """
    grid = [ceil_div(s, c) for s, c in zip(size_xyz, chunk_xyz, strict=True)]
    grid_bits = [_bits(g) for g in grid]
    total_bits = sum(grid_bits)
    limit = (
        _bits(max(1, max_chunks))
        if max_chunks & (max_chunks - 1) == 0
        else int(math.log2(max_chunks))
    )
    z_limit = (
        None
        if max_z_chunks is None
        else _bits(max_z_chunks)
        if max_z_chunks & (max_z_chunks - 1) == 0
        else int(math.log2(max_z_chunks))
    )
    used = [0, 0, 0]
    b = 0
    while b < min(limit, total_bits):
        placed = False
        for d in range(3):
            if b >= min(limit, total_bits):
                break
            if used[d] < grid_bits[d]:
                if d == 2 and z_limit is not None and used[2] >= z_limit:
                    # z may take no more bits; the morton order would still assign the
                    # next bit to z, so the box stops growing here.
                    return _layout(used, b, total_bits)
                used[d] += 1
                b += 1
                placed = True
        if not placed:
            break
    return _layout(used, b, total_bits)


def _layout(used: list[int], b: int, total_bits: int) -> ShardLayout:
    minishard = min(3, b)
    return ShardLayout(
        preshift_bits=b - minishard,
        minishard_bits=minishard,
        shard_bits=total_bits - b,
        shard_chunks_xyz=(1 << used[0], 1 << used[1], 1 << used[2]),
    )
