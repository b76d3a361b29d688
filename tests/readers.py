"""Independent readers of emflow's outputs (tensorstore, CloudVolume, zarr-python), as (z, y, x)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorstore as ts


def precomputed_tensorstore(path: Path, level: int) -> np.ndarray:
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(path) + "/"},
            "scale_index": level,
        },
        read=True,
    ).result()
    return np.asarray(store[..., 0].read().result()).transpose(2, 1, 0)


def precomputed_cloudvolume(path: Path, level: int) -> np.ndarray:
    from cloudvolume import CloudVolume

    vol = CloudVolume(f"file://{path}", mip=level, fill_missing=False, progress=False, parallel=1)
    return np.asarray(vol[:, :, :])[..., 0].transpose(2, 1, 0)


def zarr_python(path: Path, level: int) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(path / str(level)), mode="r")[:])


def zarr_tensorstore(path: Path, level: int) -> np.ndarray:
    driver = "zarr3" if (path / "zarr.json").exists() else "zarr"
    store = ts.open(
        {"driver": driver, "kvstore": {"driver": "file", "path": str(path / str(level)) + "/"}},
        read=True,
    ).result()
    return np.asarray(store.read().result())


def validate_ome_zarr(path: Path):
    """Validate with ome-zarr-models; returns the model (raises on invalid metadata)."""
    import zarr
    from ome_zarr_models import open_ome_zarr

    fmt = 3 if (path / "zarr.json").exists() else 2
    return open_ome_zarr(zarr.open_group(str(path), mode="r", zarr_format=fmt))
