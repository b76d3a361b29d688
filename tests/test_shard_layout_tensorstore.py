"""Our shard box must be the box tensorstore derives from the same sharding spec."""

from __future__ import annotations

import pytest
import tensorstore as ts

from emflow.geometry import shard_layout


@pytest.mark.parametrize(
    "size,max_z",
    [
        ((2048, 2048, 128), 1),
        ((2048, 2048, 256), 2),
        ((1000, 777, 37), None),
        ((5000, 300, 700), 4),
    ],
)
def test_shard_box_matches_tensorstore(size, max_z):
    lay = shard_layout(size, (64, 64, 64), max_chunks=4096, max_z_chunks=max_z)
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "memory"},
            "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
            "scale_metadata": {
                "size": list(size),
                "resolution": [1, 1, 1],
                "encoding": "raw",
                "chunk_size": [64, 64, 64],
                "sharding": lay.spec(),
            },
        },
        create=True,
    ).result()
    shard = store.chunk_layout.write_chunk.shape[:3]
    for axis in range(3):
        expected = min(lay.shard_chunks_xyz[axis] * 64, -(-size[axis] // 64) * 64)
        assert shard[axis] == expected, (axis, shard, lay)
