"""Open an output volume as a lazy array with physical coordinates (:func:`open`).

Both formats emflow writes are read with tensorstore (neuroglancer precomputed, raw or
JPEG, sharded or not; OME-Zarr 0.4 and 0.5), wrapped in a dask array (chunks are whole
storage chunks, grown to about :data:`TARGET_CHUNK_BYTES`), and returned as an
:class:`xarray.DataArray` with dims ``("z", "y", "x")`` and coordinates in nanometres at
voxel centres, read from the volume's own metadata:

* precomputed: voxel ``i`` covers ``[i, i + 1) × resolution`` after ``voxel_offset``, so its
  centre is ``(voxel_offset + i + 0.5) × resolution``;
* OME-Zarr: ``scale × i + translation`` (the coordinateTransformations of the level, then
  those of the multiscale), in the axes' unit converted to nm.

emflow writes both so that a voxel has the same coordinates in both formats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emflow.errors import OutputError
from emflow.io.location import Location

if TYPE_CHECKING:
    import tensorstore as ts
    import xarray

#: dask chunks are storage chunks grown (y and x first, then z) up to about this many bytes
TARGET_CHUNK_BYTES = 32 << 20
RUN_FOLDER = "emflow-run"
_UNIT_NM = {
    None: 1.0,
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "millimeter": 1e6,
    "angstrom": 0.1,
    "picometer": 1e-3,
    "meter": 1e9,
}


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: array spec, dims, shape, and where voxel centres are (per dim, nm
    for the spatial dims z, y, x)."""

    index: int
    shape_zyx: tuple[int, ...]
    voxel_size_nm_zyx: tuple[float, ...]
    origin_nm_zyx: tuple[float, ...]  # centre of voxel 0
    spec: dict[str, Any]
    dims: tuple[str, ...]


@dataclass(frozen=True)
class VolumeInfo:
    """A volume's format, location and levels (finest first)."""

    format: str  # "precomputed" | "omezarr"
    location: Location
    levels: tuple[LevelInfo, ...]
    dtype: str


# ---------------------------------------------------------------------------------------
# finding the volume
# ---------------------------------------------------------------------------------------
def _json(loc: Location, key: str) -> dict[str, Any] | None:
    raw = loc.read(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise OutputError(f"{loc.url}/{key} is not valid JSON; the volume is damaged") from None


def _run_outputs(loc: Location) -> list[str] | None:
    """Output names of the run whose output_dir is ``loc`` (recipe order), or None."""
    raw = loc.child(RUN_FOLDER).read("recipe.resolved.yaml")
    if raw is None:
        return None
    import yaml

    try:
        outputs = (yaml.safe_load(raw) or {}).get("outputs") or []
        return [str(o["name"]) for o in outputs]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None


def locate(source: Any, output: str | None = None) -> Location:
    """The volume named by ``source`` (and ``output``): see :func:`open`."""
    if hasattr(source, "output_paths") and hasattr(source, "run_dir"):  # a RunResult
        paths = dict(source.output_paths)
        if not paths:
            raise OutputError("this run wrote no outputs")
        name = output if output is not None else next(iter(paths))
        if name not in paths:
            raise OutputError(
                f"output={name!r} is not an output of this run; it wrote: {', '.join(paths)}"
            )
        return Location.of(paths[name])
    if not isinstance(source, (str, Path, Location)):
        raise TypeError(
            f"emflow.open() takes a RunResult, a path or a URL, not {type(source).__name__}"
        )
    loc = Location.of(source)
    names = _run_outputs(loc)
    if names is not None:  # an output_dir
        if output is None:
            if not names:
                raise OutputError(f"{loc.url}: its run lists no outputs")
            output = names[0]
        elif output not in names:
            raise OutputError(
                f"output={output!r}: the run in {loc.url} wrote {', '.join(names)}; pick one"
            )
        return loc.child(output)
    if output is not None:
        return loc.child(output)
    return loc


def volume_info(source: Any, output: str | None = None) -> VolumeInfo:
    """Format and levels of a volume (reads its metadata only)."""
    loc = locate(source, output)
    info = _json(loc, "info")
    if info is not None:
        return _precomputed_info(loc, info)
    group = _json(loc, "zarr.json")
    if group is not None:
        ome = (group.get("attributes") or {}).get("ome") or {}
        return _omezarr_info(loc, ome.get("multiscales"), "zarr3")
    attrs = _json(loc, ".zattrs")
    if attrs is not None or loc.exists(".zgroup"):
        return _omezarr_info(loc, (attrs or {}).get("multiscales"), "zarr")
    hint = ""
    if loc.path is not None:
        if not loc.path.exists():
            partial = loc.path.with_name(loc.path.name + ".partial")
            hint = (
                f" (only {partial.name} exists: its run has not finished; run it again to resume)"
                if partial.exists()
                else " (no such folder)"
            )
        elif loc.path.is_dir():
            found = sorted(p.name for p in loc.path.iterdir())[:6]
            hint = f" (it holds: {', '.join(found) or 'nothing'})"
    raise OutputError(
        f"{loc.url} is not a neuroglancer precomputed volume (no info) nor an OME-Zarr image "
        f"(no zarr.json or .zattrs){hint}; give a volume folder, an output_dir with output=, "
        "or a RunResult"
    )


def _precomputed_info(loc: Location, info: dict[str, Any]) -> VolumeInfo:
    channels = int(info.get("num_channels", 1))
    levels = []
    for k, sc in enumerate(info.get("scales", [])):
        x, y, z = (int(v) for v in sc["size"])
        rx, ry, rz = (float(v) for v in sc["resolution"])
        ox, oy, oz = (float(v) for v in sc.get("voxel_offset", (0, 0, 0)))
        size: tuple[float, ...] = (rz, ry, rx)
        origin: tuple[float, ...] = ((oz + 0.5) * rz, (oy + 0.5) * ry, (ox + 0.5) * rx)
        shape: tuple[int, ...] = (z, y, x)
        dims: tuple[str, ...] = ("z", "y", "x")
        if channels != 1:
            shape, dims, size, origin = (channels, *shape), ("c", *dims), (1, *size), (0, *origin)
        levels.append(
            LevelInfo(
                k,
                shape,
                size,
                origin,
                {"driver": "neuroglancer_precomputed", "kvstore": loc.kvstore, "scale_index": k},
                dims,
            )
        )
    if not levels:
        raise OutputError(f"{loc.url}/info lists no scales; the volume is damaged")
    return VolumeInfo("precomputed", loc, tuple(levels), str(info.get("data_type", "uint8")))


def _transform(transforms: Sequence[dict[str, Any]] | None, n: int) -> tuple[np.ndarray, ...]:
    scale, shift = np.ones(n), np.zeros(n)
    for t in transforms or ():
        if t.get("type") == "scale":
            v = np.asarray(t["scale"], float)
            scale, shift = scale * v, shift * v
        elif t.get("type") == "translation":
            shift = shift + np.asarray(t["translation"], float)
    return scale, shift


def _omezarr_info(loc: Location, multiscales: Any, driver: str) -> VolumeInfo:
    if not multiscales:
        raise OutputError(
            f"{loc.url} is a Zarr group without OME multiscales metadata: not a complete "
            "OME-Zarr image (emflow adds it when a run finishes; run it again to resume)"
        )
    ms = multiscales[0]
    axes = ms.get("axes") or [{"name": a} for a in "zyx"]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]  # 0.3-style names
    dims = tuple(str(a["name"]) for a in axes)
    factor = np.array(
        [
            _UNIT_NM.get(a.get("unit"), 1.0) if a.get("type", "space") == "space" else 1.0
            for a in axes
        ]
    )
    outer_scale, outer_shift = _transform(ms.get("coordinateTransformations"), len(axes))
    levels = []
    for k, ds in enumerate(ms["datasets"]):
        scale, shift = _transform(ds.get("coordinateTransformations"), len(axes))
        scale, shift = scale * outer_scale, shift * outer_scale + outer_shift
        arr = loc.child(str(ds["path"]))
        meta = _json(arr, "zarr.json" if driver == "zarr3" else ".zarray")
        if meta is None:
            raise OutputError(f"{arr.url}: level {k} of {loc.url} has no array metadata")
        levels.append(
            LevelInfo(
                k,
                tuple(int(v) for v in meta["shape"]),
                tuple(float(v) for v in scale * factor),
                tuple(float(v) for v in shift * factor),
                {"driver": driver, "kvstore": arr.kvstore},
                dims,
            )
        )
    import tensorstore as ts

    dtype = ts.open(levels[0].spec, read=True).result().dtype.name
    return VolumeInfo("omezarr", loc, tuple(levels), dtype)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
class TensorStoreArray:
    """NumPy-style read access to one level (dims as :class:`LevelInfo`), opened lazily.

    Pickles as its spec, so dask can send it to workers.
    """

    def __init__(self, level: LevelInfo, fmt: str, dtype: str) -> None:
        self.level, self.format = level, fmt
        self.shape = level.shape_zyx
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._store: ts.TensorStore | None = None

    def store(self) -> ts.TensorStore:
        import tensorstore as ts

        if self._store is None:
            s = ts.open(self.level.spec, read=True).result()
            if self.format == "precomputed":  # (x, y, z, channel) -> (z, y, x) / (c, z, y, x)
                s = s[..., 0].T if len(self.shape) == 3 else s.T
            self._store = s
        return self._store

    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.store().chunk_layout.read_chunk.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.store()[key].read().result())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}


def grown_chunks(chunk: Sequence[int], shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """``chunk`` doubled along the last axes first (x, y), then the others, while it stays
    within :data:`TARGET_CHUNK_BYTES` and the shape."""
    out = [max(1, min(int(c), int(n))) for c, n in zip(chunk, shape, strict=True)]
    last = list(range(len(out)))[-2:][::-1]
    for axes in (last, list(range(len(out)))[::-1]):  # x and y in turn, then all axes in turn
        grew = True
        while grew:
            grew = False
            for a in axes:
                if out[a] >= shape[a]:
                    continue
                if math.prod(out) * 2 * itemsize > TARGET_CHUNK_BYTES:
                    return tuple(out)
                out[a] = min(out[a] * 2, int(shape[a]))
                grew = True
    return tuple(out)


def open(
    source: Any,
    level: int = 0,
    output: str | None = None,
) -> xarray.DataArray:
    """A lazily loaded level of an output volume, as an ``xarray.DataArray`` backed by dask.

    Parameters
    ----------
    source
        A :class:`~emflow.pipeline.RunResult`, a volume folder (precomputed or OME-Zarr), a
        run's ``output_dir``, or a URL of either (``file://``, ``http(s)://``, ``gs://``,
        ``s3://``).
    level
        Pyramid level, 0 = full resolution; negative counts from the coarsest (-1).
    output
        Which output of a run (its ``name`` in the recipe); default: the first listed.

    Returns
    -------
    xarray.DataArray
        dims ``("z", "y", "x")``; coordinates are voxel centres in nanometres; ``attrs`` hold
        ``voxel_size_nm`` (z, y, x), ``format``, ``source``, ``level`` and ``levels``. Nothing
        is read until you index and ``.values`` / ``.compute()`` it.
    """
    try:
        import xarray as xr
    except ImportError:
        raise OutputError(
            "emflow.open needs xarray: pip install 'emflow[notebook]' (or pip install xarray)"
        ) from None
    import dask.array as da
    from dask.base import tokenize

    vol = volume_info(source, output)
    n = len(vol.levels)
    if not -n <= level < n:
        raise OutputError(f"level={level}: {vol.location.url} has levels 0..{n - 1}")
    lev = vol.levels[level]
    arr = TensorStoreArray(lev, vol.format, vol.dtype)
    chunks = grown_chunks(arr.chunk_shape(), lev.shape_zyx, arr.dtype.itemsize)
    data = da.from_array(
        arr,
        chunks=chunks,
        name=f"emflow-open-{tokenize(vol.location.url, lev.index, lev.spec)}",
        lock=False,
        asarray=True,
        meta=np.empty((0,) * arr.ndim, arr.dtype),
    )
    coords = {}
    for axis, dim in enumerate(lev.dims):
        if dim not in ("z", "y", "x"):
            continue
        step, first = lev.voxel_size_nm_zyx[axis], lev.origin_nm_zyx[axis]
        values = first + step * np.arange(lev.shape_zyx[axis], dtype=np.float64)
        coords[dim] = xr.Variable(dim, values, attrs={"units": "nm"})
    return xr.DataArray(
        data,
        dims=lev.dims,
        coords=coords,
        name=vol.location.name,
        attrs={
            "format": vol.format,
            "source": vol.location.url,
            "level": lev.index,
            "levels": n,
            "voxel_size_nm": tuple(
                v for v, d in zip(lev.voxel_size_nm_zyx, lev.dims, strict=True) if d in "zyx"
            ),
            "units": "nm",
        },
    )
