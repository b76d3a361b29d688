"""Peer: ome-zarr-py -> OME-Zarr 0.5 (zarr3 sharded, zstd-1), 5 levels of local means.

Runs inside benchmarks/.venvs/ome-zarr-py. As its docs suggest: ``write_image(image,
group, scale_factors=[{"z": f, "y": f, "x": f}, ...], method=Methods.LOCAL_MEAN,
fmt=FormatV05(), axes="zyx", scale=..., storage_options=...)`` with dict factors (int
factors never downsample z). Storage: 64^3 chunks in shards of up to 128x1024x1024 and a
zstd level-1 compressor, like emflow's; the dask array is chunked on the shard grid so no
two tasks write one shard. Decode is cv2 in 2 threads; dask's threaded scheduler.

    python ome_zarr_py_run.py SRC OUT --voxel-nm 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_stack, fresh_dir, now, peer_args, report


def main():
    a = peer_args()
    import dask
    import dask.array as da
    import ome_zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image
    from zarr.codecs import ZstdCodec

    dask.config.set(scheduler="threads", num_workers=a.threads)
    out = fresh_dir(a.out)
    t0 = now()
    vol = decode_stack(a.src, a.threads)
    t1 = now()
    cap = (128, 1024, 1024)

    def shard_of(shape):
        return tuple(min(c, -(-n // 64) * 64) for c, n in zip(cap, shape, strict=True))

    image = da.from_array(vol, chunks=shard_of(vol.shape))
    options = []
    for lvl in range(a.levels):
        shape = [-(-s // 2**lvl) for s in vol.shape]
        options.append(
            {"chunks": (64, 64, 64), "shards": shard_of(shape), "compressors": ZstdCodec(level=1)}
        )
    write_image(
        image,
        str(out / "image.ome.zarr"),
        scale_factors=[{"z": 2**i, "y": 2**i, "x": 2**i} for i in range(1, a.levels)],
        method=Methods.LOCAL_MEAN,
        fmt=FormatV05(),
        axes="zyx",
        scale={d: a.voxel_nm for d in "zyx"},
        axes_units={d: "nanometer" for d in "zyx"},
        storage_options=options,
    )
    t2 = now()
    report(
        decode_s=t1 - t0,
        pyramid_write_s=t2 - t1,
        total_s=t2 - t0,
        input_bytes=int(vol.nbytes),
        codec="zstd-1",
        version=ome_zarr.__version__,
    )


if __name__ == "__main__":
    sys.exit(main())
