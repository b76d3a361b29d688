"""Synthetic EM-like stacks: membrane-delimited cells with organelles and shot noise.

The texture is a slice through a 3D Voronoi tessellation (cells of a few hundred
px whose walls are dark membranes), plus dark round organelles and Gaussian
noise, so consecutive slices are correlated like serial sections and SIFT finds
plenty of junctions to match. Everything is seeded and reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

#: grey values of a typical 8-bit TEM/SEM slice (membranes dark, cytoplasm bright)
_CYTOPLASM = 170.0
_MEMBRANE = 55.0
_NOISE_SIGMA = 9.0
_GRAIN = 14.0  # std of the granular cytoplasm texture (grey values)


def synthetic_slices(
    shape_zyx: tuple[int, int, int],
    *,
    seed: int = 0,
    cell_size_px: float = 160.0,
    z_step_px: float = 12.0,
    dtype: type | np.dtype = np.uint8,
) -> Iterator[np.ndarray]:
    """Yield the (y, x) slices of a synthetic EM-like stack one at a time.

    Parameters
    ----------
    shape_zyx
        Stack shape (z, y, x).
    seed
        Seed of every random choice; the same seed gives the same stack.
    cell_size_px
        Typical cell diameter in pixels.
    z_step_px
        Section thickness in the same pixel units (how fast cells change along z).
    dtype
        ``uint8`` (0..255) or ``uint16`` (values scaled to about 0..60000).
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    rng = np.random.default_rng(seed)
    # Work on a coarse grid (membranes are smooth), then upsample: cheap for 4k+ slices.
    coarse = max(1, int(cell_size_px // 40))
    cy, cx = -(-ny // coarse), -(-nx // coarse)
    depth = nz * z_step_px + 2 * cell_size_px
    n_cells = max(8, int(ny * nx * depth / cell_size_px**3 * 1.5))
    seeds = rng.uniform(
        [-cell_size_px, -cell_size_px, -cell_size_px],
        [ny + cell_size_px, nx + cell_size_px, depth - cell_size_px],
        size=(n_cells, 3),
    )
    tree = cKDTree(seeds)
    n_org = max(4, int(ny * nx * depth / (cell_size_px**3) * 3))
    organelles = rng.uniform([0, 0, 0], [ny, nx, depth], size=(n_org, 3))
    radii = rng.uniform(0.08, 0.22, size=n_org) * cell_size_px
    gy, gx = np.meshgrid(
        (np.arange(cy) + 0.5) * coarse, (np.arange(cx) + 0.5) * coarse, indexing="ij"
    )
    membrane_width = max(2.0, cell_size_px / 40)
    noise_rng = np.random.default_rng(seed + 1)
    # granular cytoplasm: blurred noise fields, cross-faded along z so features persist
    # over a few sections (what lets SIFT link neighbouring slices)
    keyframe_every = 8
    fields: dict[int, np.ndarray] = {}

    def field(k: int) -> np.ndarray:
        if k not in fields:
            frng = np.random.default_rng([seed, 7, k])
            f = frng.normal(0.0, 1.0, size=(ny, nx)).astype(np.float32)
            f = cv2.GaussianBlur(f, (0, 0), 2.5)
            f *= _GRAIN / max(float(f.std()), 1e-6)
            fields.clear() if len(fields) > 2 else None
            fields[k] = f
        return fields[k]

    for z in range(nz):
        zc = cell_size_px + z * z_step_px
        pts = np.column_stack([gy.ravel(), gx.ravel(), np.full(gy.size, zc)])
        dist, _ = tree.query(pts, k=2)
        wall = (dist[:, 1] - dist[:, 0]).reshape(cy, cx).astype(np.float32)
        img = _CYTOPLASM - (_CYTOPLASM - _MEMBRANE) * np.exp(-((wall / membrane_width) ** 2))
        # organelles: dark discs cut by this section
        dz = np.abs(organelles[:, 2] - zc)
        cut = dz < radii
        for (oy, ox, _), r, d in zip(organelles[cut], radii[cut], dz[cut], strict=True):
            rr = np.sqrt(r * r - d * d) / coarse
            cv2.circle(
                img, (int(ox / coarse), int(oy / coarse)), max(1, int(rr)), _MEMBRANE + 25, -1
            )
        full = cv2.resize(img, (nx, ny), interpolation=cv2.INTER_LINEAR)
        k, w = divmod(z, keyframe_every)
        w = w / keyframe_every
        grain = (1.0 - w) * field(k) + w * field(k + 1)
        full += grain * ((full - _MEMBRANE) / (_CYTOPLASM - _MEMBRANE))
        full = cv2.GaussianBlur(full, (0, 0), 1.2)
        full += noise_rng.normal(0.0, _NOISE_SIGMA, size=full.shape).astype(np.float32)
        if np.dtype(dtype) == np.uint16:
            out = np.clip(full * 235.0, 0, 65535).astype(np.uint16)
        else:
            out = np.clip(np.rint(full), 1, 255).astype(np.uint8)
        yield out


def synthetic_stack(
    shape_zyx: tuple[int, int, int], *, seed: int = 0, dtype: type | np.dtype = np.uint8, **kw
) -> np.ndarray:
    """Return a whole synthetic EM-like stack as a (z, y, x) array (see :func:`synthetic_slices`)."""
    out = np.empty(shape_zyx, dtype=dtype)
    for z, sl in enumerate(synthetic_slices(shape_zyx, seed=seed, dtype=dtype, **kw)):
        out[z] = sl
    return out


def write_stack(
    slices: np.ndarray | Iterator[np.ndarray],
    directory: str | Path,
    *,
    pattern: str = "img%05d.png",
    z_start: int = 0,
) -> list[Path]:
    """Write slices as numbered image files (format from the extension: png, tif, jpg).

    Returns the written paths in z order. TIFFs are written uncompressed with tifffile.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sl in enumerate(slices):
        path = directory / (pattern % (z_start + i))
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(path, sl)
        elif not cv2.imwrite(str(path), sl):
            raise OSError(f"could not write {path}")
        paths.append(path)
    return paths
