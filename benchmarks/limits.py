"""Per-core kernel limits (single thread) and the derived per-core limit of the pipeline.

Every ``measure_*`` function takes its input array (so tests can pass tiny ones), runs the
kernel single-threaded (``cv2.setNumThreads(1)``), and returns a dict with ``mb_s`` (MB/s of
the bytes named in ``per``, MB = 1e6 B), ``s_per_call`` and kernel-specific extras such as
the compression ``ratio``. Timing is the median over ``runs`` of ``repeats`` calls each.

:func:`cost_model` turns the kernel rates into CPU-seconds per GB of level-0 input for each
output, the way ../shared/notes/PERFORMANCE.md §4 does: one decode + the work each output
needs per byte (all levels of a 2x2x2 pyramid = 1.143x level 0) + writing the output bytes
to the page cache + one copy. The wall limit on N cores is N x 1000 / (CPU-s per GB) MB/s.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from benchmarks.pyramid_ref import pyramid

LEVELS = 5
#: bytes of all levels of a 2x2x2 pyramid relative to level 0
LEVEL_FACTOR = sum(8.0**-lvl for lvl in range(LEVELS))


def _timeit(fn: Callable[[], object], repeats: int, runs: int) -> float:
    """Median over ``runs`` of the mean time of one call in ``repeats`` calls (seconds)."""
    fn()  # warm-up (allocations, lazy init)
    per_call = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        per_call.append((time.perf_counter() - t0) / repeats)
    return statistics.median(per_call)


def _result(nbytes: int, s: float, per: str, **extra: object) -> dict:
    return {
        "mb_s": nbytes / s / 1e6,
        "s_per_call": s,
        "bytes_per_call": nbytes,
        "per": per,
        **extra,
    }


def single_thread() -> None:
    cv2.setNumThreads(1)


# --- kernels ----------------------------------------------------------------------------


def measure_png_decode(slice_yx: np.ndarray, repeats: int = 5, runs: int = 3) -> dict:
    """cv2.imdecode of an in-memory PNG (cv2 default compression), per decoded byte."""
    single_thread()
    ok, buf = cv2.imencode(".png", slice_yx)
    assert ok
    s = _timeit(lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), repeats, runs)
    return _result(
        slice_yx.nbytes,
        s,
        "decoded bytes",
        file_ratio=slice_yx.nbytes / buf.size,
        shape=list(slice_yx.shape),
    )


def measure_jpeg_encode(
    chunk_zyx: np.ndarray, quality: int = 90, repeats: int = 10, runs: int = 3
) -> dict:
    """JPEG encode of a chunk laid out as one (z*y, x) image (neuroglancer's layout).

    cv2 is the figure; simplejpeg is measured too when installed (``simplejpeg_mb_s``).
    """
    single_thread()
    img = np.ascontiguousarray(chunk_zyx.reshape(-1, chunk_zyx.shape[-1]))
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    s = _timeit(lambda: cv2.imencode(".jpg", img, params), repeats, runs)
    extra: dict = {
        "ratio": img.nbytes / buf.size,
        "image_shape": list(img.shape),
        "quality": quality,
        "library": "cv2",
    }
    try:
        import simplejpeg

        img3 = img[:, :, None]
        s2 = _timeit(
            lambda: simplejpeg.encode_jpeg(
                img3, quality=quality, colorspace="GRAY", colorsubsampling="Gray"
            ),
            repeats,
            runs,
        )
        extra["simplejpeg_mb_s"] = img.nbytes / s2 / 1e6
    except ImportError:
        pass
    return _result(img.nbytes, s, "raw chunk bytes", **extra)


def measure_zstd(chunk_zyx: np.ndarray, level: int = 1, repeats: int = 10, runs: int = 3) -> dict:
    """numcodecs Zstd(level) encode of one chunk (the OME-Zarr codec), plus decode speed."""
    from numcodecs import Zstd

    codec = Zstd(level=level)
    data = np.ascontiguousarray(chunk_zyx)
    enc = codec.encode(data)
    s = _timeit(lambda: codec.encode(data), repeats, runs)
    sd = _timeit(lambda: codec.decode(enc), repeats, runs)
    return _result(
        data.nbytes,
        s,
        "raw chunk bytes",
        ratio=data.nbytes / len(enc),
        level=level,
        decode_mb_s=data.nbytes / sd / 1e6,
    )


def measure_downsample(
    block_zyx: np.ndarray, levels: int = LEVELS, repeats: int = 3, runs: int = 3
) -> dict:
    """2x2x2 integer mean pyramid (benchmarks.pyramid_ref, rounded once), per level-0 byte.

    ``mb_s`` is for all ``levels - 1`` downsampled levels from level 0; ``one_level_mb_s``
    for level 1 only.
    """
    s = _timeit(lambda: pyramid(block_zyx, levels), repeats, runs)
    s1 = _timeit(lambda: pyramid(block_zyx, 2), repeats, runs)
    return _result(
        block_zyx.nbytes,
        s,
        "level-0 bytes",
        levels=levels,
        one_level_mb_s=block_zyx.nbytes / s1 / 1e6,
        kernel="numpy uint16 sums",
    )


def measure_warp(slice_yx: np.ndarray, repeats: int = 5, runs: int = 3) -> dict:
    """cv2.warpAffine, bilinear, a small rotation + shift, same output size, border 0."""
    single_thread()
    h, w = slice_yx.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 1.5, 1.0)
    m[:, 2] += (3.25, -2.5)
    s = _timeit(
        lambda: cv2.warpAffine(
            slice_yx,
            m,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        ),
        repeats,
        runs,
    )
    return _result(slice_yx.nbytes, s, "slice bytes")


#: CLAHE parameters of the benchmark recipes (emflow.recipe.Enhance fields)
CLAHE_KERNEL_PX, CLAHE_CLIP = 1024, 0.02


def _clahe_fn() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """emflow.enhance.clahe called as emflow.render calls it, else skimage's."""
    try:
        from emflow.enhance import clahe  # type: ignore[attr-defined]

        def fn(a: np.ndarray) -> np.ndarray:
            return clahe(
                a,
                origin_yx=(0, 0),
                frame_shape_yx=a.shape,
                kernel_size_px=CLAHE_KERNEL_PX,
                clip_limit=CLAHE_CLIP,
            )

        return fn, (
            f"emflow.enhance.clahe(kernel_size_px={CLAHE_KERNEL_PX}, clip_limit={CLAHE_CLIP})"
        )
    except ImportError:
        from skimage.exposure import equalize_adapthist

        def sk(a: np.ndarray) -> np.ndarray:
            return equalize_adapthist(a, kernel_size=CLAHE_KERNEL_PX, clip_limit=CLAHE_CLIP)

        return sk, (
            f"skimage.exposure.equalize_adapthist(kernel_size={CLAHE_KERNEL_PX}, "
            f"clip_limit={CLAHE_CLIP}) (emflow.enhance not present)"
        )


def measure_clahe(slice_yx: np.ndarray, repeats: int = 1, runs: int = 3) -> dict:
    """CLAHE of one slice: emflow.enhance.clahe if present, else skimage (see ``impl``).

    cv2.createCLAHE is measured alongside as a reference (``cv2_mb_s``).
    """
    single_thread()
    fn, impl = _clahe_fn()
    try:
        s = _timeit(lambda: fn(slice_yx), repeats, runs)
    except TypeError as exc:  # an emflow signature that needs arguments: fall back, say so
        from skimage.exposure import equalize_adapthist

        def fn(a: np.ndarray) -> np.ndarray:
            return equalize_adapthist(a, kernel_size=CLAHE_KERNEL_PX, clip_limit=CLAHE_CLIP)

        impl = f"skimage equalize_adapthist (emflow.enhance.clahe failed: {exc})"
        s = _timeit(lambda: fn(slice_yx), repeats, runs)
    tiles = (
        max(1, slice_yx.shape[1] // CLAHE_KERNEL_PX),
        max(1, slice_yx.shape[0] // CLAHE_KERNEL_PX),
    )
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=tiles)
    s_cv = _timeit(lambda: ref.apply(slice_yx), max(1, repeats * 3), runs)
    return _result(
        slice_yx.nbytes, s, "slice bytes", impl=impl, cv2_mb_s=slice_yx.nbytes / s_cv / 1e6
    )


def measure_sift(
    slice_yx: np.ndarray,
    feature_size: int = 1024,
    nfeatures: int = 4000,
    repeats: int = 1,
    runs: int = 3,
) -> dict:
    """SIFT on the reduced feature copy: INTER_AREA resize to ``feature_size`` px wide, then
    cv2.SIFT_create(nfeatures).detectAndCompute. ``mb_s`` is per byte of the full slice."""
    single_thread()
    h, w = slice_yx.shape
    fw = min(feature_size, w)
    fh = max(1, round(h * fw / w))
    sift = cv2.SIFT_create(nfeatures=nfeatures)

    def run() -> int:
        small = cv2.resize(slice_yx, (fw, fh), interpolation=cv2.INTER_AREA)
        kp, _desc = sift.detectAndCompute(small, None)
        return len(kp)

    n_kp = run()
    s = _timeit(run, repeats, runs)
    return _result(
        slice_yx.nbytes,
        s,
        "full-slice bytes",
        keypoints=n_kp,
        feature_shape=[fh, fw],
        s_per_slice=s,
    )


def measure_page_cache_write(
    nbytes: int = 64 * 2**20, directory: str | Path | None = None, repeats: int = 3, runs: int = 3
) -> dict:
    """Writing a file into the page cache (no fsync), then unlinking it."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    d = Path(directory or tempfile.gettempdir())
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"pagecache-{os.getpid()}.bin"

    def run() -> None:
        with open(path, "wb") as fh:
            fh.write(data)
        path.unlink()

    s = _timeit(run, repeats, runs)
    return _result(nbytes, s, "written bytes", directory=str(d))


def measure_page_cache_growth(
    nbytes: int = 512 * 2**20,
    file_bytes: int = 64 * 2**20,
    directory: str | Path | None = None,
    runs: int = 3,
) -> dict:
    """Writing NEW files into the page cache (no fsync) and keeping them: what a pipeline's
    output bytes cost, since they stay in the page cache as new pages. ``page_cache_write``
    rewrites one file whose pages were freed a moment before and so reuses them; on a VM whose
    host takes the guest's free memory back (virtio-balloon free page reporting, DAMON
    pageout) a new page costs a trap to the host the first time it is touched, ~10x more
    (this machine, 2026-12-03: 250-350 vs 2,800-3,200 MB/s). Every run writes ``nbytes`` in
    files of ``file_bytes``; all of them are kept until the last run is timed."""
    data = np.random.default_rng(1).integers(0, 256, file_bytes, dtype=np.uint8).tobytes()
    d = Path(directory or tempfile.gettempdir())
    d.mkdir(parents=True, exist_ok=True)
    kept: list[Path] = []
    times = []
    try:
        for run in range(runs):
            paths = [
                d / f"pagecache-new-{os.getpid()}-{run}-{i}.bin"
                for i in range(max(1, nbytes // file_bytes))
            ]
            kept += paths
            t0 = time.perf_counter()
            for path in paths:
                with open(path, "wb") as fh:
                    fh.write(data)
            times.append(time.perf_counter() - t0)
    finally:
        for path in kept:
            path.unlink(missing_ok=True)
    written = max(1, nbytes // file_bytes) * file_bytes
    return _result(written, statistics.median(times), "written bytes", directory=str(d),
                   runs_mb_s=[round(written / t / 1e6, 1) for t in times])  # fmt: skip


def measure_copy(nbytes: int = 64 * 2**20, repeats: int = 5, runs: int = 3) -> dict:
    """np.copyto between two preallocated buffers (the 'copies' line of the cost model)."""
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    s = _timeit(lambda: np.copyto(b, a), repeats, runs)
    return _result(nbytes, s, "copied bytes")


# --- inputs and the whole set -------------------------------------------------------------


def sample_inputs(size: int = 2048, chunk: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Slices and blocks with the benchmark texture (emflow.testing): a ``size``² slice and a
    ``chunk``³ block cut from the same kind of stack, plus a (64, 512, 512) downsample block."""
    from emflow.testing import synthetic_slices

    sl = next(iter(synthetic_slices((1, size, size), seed=seed)))
    side = max(chunk, min(size, 512))
    block = np.stack(list(synthetic_slices((chunk, side, side), seed=seed + 7)))
    return {"slice": sl, "chunk": np.ascontiguousarray(block[:, :chunk, :chunk]), "block": block}


def measure_all(
    inputs: dict[str, np.ndarray], quick: bool = False, scratch: str | Path | None = None
) -> dict[str, dict]:
    """Every kernel once, single-threaded. ``quick`` cuts repeats to a minimum."""
    r = 1 if quick else None

    def kw(n: int) -> dict:
        return {"repeats": r or n, "runs": 1 if quick else 3}

    sl, chunk, block = inputs["slice"], inputs["chunk"], inputs["block"]
    out = {
        "png_decode": measure_png_decode(sl, **kw(5)),
        "jpeg_q90_encode": measure_jpeg_encode(chunk, **kw(10)),
        "zstd1_encode": measure_zstd(chunk, **kw(10)),
        "downsample_2x_mean": measure_downsample(block, **kw(3)),
        "warp_affine_linear": measure_warp(sl, **kw(5)),
        "clahe": measure_clahe(sl, **kw(1)),
        "sift_feature_copy": measure_sift(sl, **kw(1)),
        "page_cache_write": measure_page_cache_write(
            (4 if quick else 64) * 2**20, scratch, **kw(3)
        ),
        "page_cache_growth": measure_page_cache_growth(
            (16 if quick else 512) * 2**20,
            (4 if quick else 64) * 2**20,
            scratch,
            runs=1 if quick else 3,
        ),
        "memcpy": measure_copy((4 if quick else 64) * 2**20, **kw(5)),
    }
    return out


# --- derived limit ------------------------------------------------------------------------


def cost_model(k: dict[str, dict], cores: int = 2) -> dict[str, dict]:
    """CPU-s per GB of level-0 input, per output, and the wall limit on ``cores`` cores.

    Outputs: ``jpeg`` (precomputed JPEG q90 sharded, 5 levels), ``zstd`` (OME-Zarr zstd-1),
    ``jpeg+zstd`` (both from one decode: the emflow case), ``full`` (jpeg+zstd plus warp,
    CLAHE and SIFT on the feature copy; one decode, the slice kept as zstd-1 between the
    feature and render passes), ``full_decode_twice`` (no cache, PNG decoded twice),
    ``jpeg+zstd+clahe``, two what-ifs with OpenCV's CLAHE speed (``*cv2_clahe``), and
    ``jpeg+zstd_tiff``: both outputs from uncompressed TIFF slices (reading them costs a copy
    from the page cache instead of a PNG decode; the large-stack benchmarks). Output bytes
    are written at the cost of reused page-cache pages (``page_cache_write``), the cheapest
    this machine allows.
    """

    def per_gb(name: str, factor: float = 1.0) -> float:
        return factor * 1000.0 / k[name]["mb_s"]

    # output bytes at the cost of reused page-cache pages: a writer that drops each durable
    # output file's pages (emflow.io.pagecache) has its next writes reuse them; new pages
    # (page_cache_growth, ~10x dearer on this VM) are reported, not charged
    write = k["page_cache_write"]["mb_s"]
    jratio = k["jpeg_q90_encode"]["ratio"]
    zratio = k["zstd1_encode"]["ratio"]
    parts = {
        "decode": per_gb("png_decode"),
        "downsample": per_gb("downsample_2x_mean"),
        "copies": per_gb("memcpy"),
        "jpeg": per_gb("jpeg_q90_encode", LEVEL_FACTOR),
        "jpeg_write": LEVEL_FACTOR / jratio * 1000.0 / write,
        "zstd": per_gb("zstd1_encode", LEVEL_FACTOR),
        "zstd_write": LEVEL_FACTOR / zratio * 1000.0 / write,
        # the feature pass keeps the decoded slice as zstd-1 for the render pass (DESIGN
        # invariant 1): encode + write + decode of level 0 once
        "slice_cache": (
            1000.0 / k["zstd1_encode"]["mb_s"]
            + 1000.0 / zratio / write
            + 1000.0 / k["zstd1_encode"]["decode_mb_s"]
        ),
        "warp": per_gb("warp_affine_linear"),
        "clahe": per_gb("clahe"),
        "clahe_cv2": 1000.0 / k["clahe"]["cv2_mb_s"],
        "sift": per_gb("sift_feature_copy"),
        "tiff_read": per_gb("memcpy"),
    }
    base = ["decode", "downsample", "copies"]
    recipes = {
        "jpeg": [*base, "jpeg", "jpeg_write"],
        "zstd": [*base, "zstd", "zstd_write"],
        "jpeg+zstd": [*base, "jpeg", "jpeg_write", "zstd", "zstd_write"],
        "full": [
            *base,
            "slice_cache",
            "jpeg",
            "jpeg_write",
            "zstd",
            "zstd_write",
            "warp",
            "clahe",
            "sift",
        ],
        "full_decode_twice": [
            *base,
            "decode",
            "jpeg",
            "jpeg_write",
            "zstd",
            "zstd_write",
            "warp",
            "clahe",
            "sift",
        ],
        "jpeg+zstd+clahe": [*base, "jpeg", "jpeg_write", "zstd", "zstd_write", "clahe"],
        # what-if: the same with OpenCV's CLAHE kernel (not tile-invariant as is)
        "full_cv2_clahe": [
            *base,
            "slice_cache",
            "jpeg",
            "jpeg_write",
            "zstd",
            "zstd_write",
            "warp",
            "clahe_cv2",
            "sift",
        ],
        "jpeg+zstd+cv2_clahe": [*base, "jpeg", "jpeg_write", "zstd", "zstd_write", "clahe_cv2"],
        "jpeg+zstd_tiff": [
            "tiff_read",
            "downsample",
            "copies",
            "jpeg",
            "jpeg_write",
            "zstd",
            "zstd_write",
        ],
    }
    out = {}
    for name, items in recipes.items():
        cpu = sum(parts[i] for i in items)
        out[name] = {
            "cpu_s_per_gb": cpu,
            "mb_s_per_core": 1000.0 / cpu,
            "mb_s_limit": cores * 1000.0 / cpu,
            "cores": cores,
            "parts_cpu_s_per_gb": {i: parts[i] for i in items},
        }
    return out


def full_limit_at(k: dict[str, dict], size: int, measured_size: int, cores: int = 2) -> dict:
    """The ``full`` limit for slices of ``size``² when the kernels were measured at
    ``measured_size``²: SIFT runs on a working copy of at most 1024 px, so its cost per slice
    stays and its cost per GB of input falls with the slice area; every other part is per byte.
    """
    model = cost_model(k, cores)["full"]
    parts = dict(model["parts_cpu_s_per_gb"])
    work_now = min(size, 1024) ** 2 / size**2
    work_then = min(measured_size, 1024) ** 2 / measured_size**2
    parts["sift"] *= work_now / work_then
    cpu = sum(parts.values())
    return {
        "cpu_s_per_gb": cpu,
        "mb_s_per_core": 1000.0 / cpu,
        "mb_s_limit": cores * 1000.0 / cpu,
        "cores": cores,
        "parts_cpu_s_per_gb": parts,
    }
