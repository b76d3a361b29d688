"""Peer: ngff-zarr -> OME-Zarr 0.5 (zarr3 sharded, zstd-1), 5 levels of local means.

Runs inside benchmarks/.venvs/ngff-zarr. As its docs suggest: ``to_ngff_image`` ->
``to_multiscales(scale_factors=[2, 4, 8, 16], method=Methods.DASK_BIN_SHRINK, chunks=64)``
-> ``to_ngff_zarr(version="0.5", chunks_per_shard=(2, 16, 16))`` (shards of 128x1024x1024
like emflow's) with ``compressors=[{"name": "zstd", "configuration": {"level": 1}}]``
so the output codec matches.
Decode is cv2 in 2 threads, as for every other variant; dask uses its threaded scheduler.

    python ngff_zarr_run.py SRC OUT --voxel-nm 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_stack, fresh_dir, now, peer_args, report


def main():
    a = peer_args()
    import dask
    import ngff_zarr as nz

    dask.config.set(scheduler="threads", num_workers=a.threads)
    out = fresh_dir(a.out)
    t0 = now()
    vol = decode_stack(a.src, a.threads)
    t1 = now()
    img = nz.to_ngff_image(
        vol,
        dims=("z", "y", "x"),
        scale={d: a.voxel_nm for d in "zyx"},
        axes_units={d: "nanometer" for d in "zyx"},
    )
    ms = nz.to_multiscales(
        img,
        scale_factors=[2**i for i in range(1, a.levels)],
        method=nz.Methods.DASK_BIN_SHRINK,
        chunks=64,
    )
    # a zarr v3 codec dict is one of the compressor forms to_ngff_zarr accepts
    kwargs = {"compressors": [{"name": "zstd", "configuration": {"level": 1}}]}
    codec = "zstd-1"
    nz.to_ngff_zarr(
        str(out / "image.ome.zarr"), ms, version="0.5", chunks_per_shard=(2, 16, 16), **kwargs
    )
    t2 = now()
    report(
        decode_s=t1 - t0,
        pyramid_write_s=t2 - t1,
        total_s=t2 - t0,
        input_bytes=int(vol.nbytes),
        codec=codec,
        version=nz.__version__,
    )


if __name__ == "__main__":
    sys.exit(main())
