"""Slice readers: image headers without decoding, and full decodes to (y, x) arrays.

PNG and JPEG are decoded with OpenCV (releases the GIL, ~100 MB/s per core for
PNG), TIFF with tifffile (one page per z for multi-page files). Every failure is
a :class:`~emflow.errors.SourceError` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from emflow.errors import SourceError
from emflow.io.location import is_url

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageHeader:
    """What a file holds, read from its header: pages (z), shape (y, x) and dtype."""

    path: str
    pages: int
    shape_yx: tuple[int, int]
    dtype: str  # numpy dtype name: "uint8" | "uint16"


_DAMAGED = "re-export it, or remove it and set source.missing to fill its place"


def _tail(fh, n: int) -> bytes:
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(max(0, size - n))
    return fh.read(n)


def _png_header(path: Path) -> ImageHeader:
    with open(path, "rb") as fh:
        head = fh.read(33)
        tail = _tail(fh, 12)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        what = "is empty (0 bytes)" if not head else "is not a PNG file (bad header)"
        raise SourceError(f"{path} {what}; {_DAMAGED}")
    if tail[4:8] != b"IEND":
        raise SourceError(f"{path} is truncated (no PNG end marker); {_DAMAGED}")
    width, height, bit_depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in (0, 4):  # greyscale (with or without alpha)
        raise SourceError(
            f"{path} is a colour PNG (colour type {colour}); emflow ingests greyscale EM slices: "
            "convert the stack to 8- or 16-bit greyscale"
        )
    if bit_depth not in (8, 16):
        raise SourceError(f"{path} has {bit_depth}-bit pixels; emflow reads 8- and 16-bit images")
    return ImageHeader(str(path), 1, (height, width), "uint8" if bit_depth == 8 else "uint16")


def _jpeg_header(path: Path) -> ImageHeader:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
        with open(path, "rb") as fh:
            tail = _tail(fh, 1024)
    except (UnidentifiedImageError, OSError) as exc:
        raise SourceError(f"{path} is not a readable JPEG file ({exc}); {_DAMAGED}") from None
    if b"\xff\xd9" not in tail:  # entropy-coded data never holds FFD9: the end marker is missing
        raise SourceError(f"{path} is truncated (no JPEG end marker); {_DAMAGED}")
    if mode != "L":
        raise SourceError(
            f"{path} is a {mode} JPEG; emflow ingests greyscale EM slices: convert to greyscale"
        )
    return ImageHeader(str(path), 1, (height, width), "uint8")


def _tiff_header(path: Path) -> ImageHeader:
    import tifffile

    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            pages = tif.pages
            first = pages.first
            shape, dtype = first.shape, first.dtype
            n = len(pages)
            ends = [o + c for o, c in zip(first.dataoffsets, first.databytecounts, strict=False)]
            raw = int(first.compression) == 1 and not first.is_tiled
            declared = int(np.prod(shape)) * np.dtype(dtype).itemsize if dtype is not None else 0
            stored = sum(first.databytecounts)
    except Exception as exc:  # tifffile raises many types for damaged files
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "is not a readable TIFF file"
        raise SourceError(f"{path} {what} ({first_line}); {_DAMAGED}") from None
    if ends and max(ends) > size:
        raise SourceError(
            f"{path} is truncated: its pixel data ends at byte {max(ends)} but the file has "
            f"{size}; {_DAMAGED}"
        )
    if raw and declared and stored < declared:
        raise SourceError(
            f"{path} declares {shape[-1]} × {shape[0]} px but holds only {stored} bytes of "
            f"pixels ({declared} needed): the header is damaged; {_DAMAGED}"
        )
    if len(shape) != 2:
        raise SourceError(
            f"{path}: pages have shape {shape}; emflow reads greyscale (y, x) pages "
            "(one page per z): convert colour or multi-sample TIFFs to greyscale"
        )
    if np.dtype(dtype) not in (np.uint8, np.uint16):
        raise SourceError(f"{path} holds {dtype} pixels; emflow reads uint8 and uint16 images")
    return ImageHeader(str(path), n, (int(shape[0]), int(shape[1])), np.dtype(dtype).name)


def read_header(path: str | Path) -> ImageHeader:
    """Read an image's header (no pixel decode): pages, (y, x) shape and dtype.

    ``path`` may be an s3://, gs:// or http(s):// URL (read by byte ranges,
    :mod:`emflow.io.remote`)."""
    if is_url(path):
        from emflow.io import remote

        return remote.read_header(str(path))
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            return _png_header(path)
        if suffix in (".tif", ".tiff"):
            return _tiff_header(path)
        if suffix in (".jpg", ".jpeg"):
            return _jpeg_header(path)
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except PermissionError:
        raise SourceError(f"{path} cannot be read (permission denied)") from None
    raise SourceError(f"{path}: unsupported image type '{suffix}' (use PNG, TIFF or JPEG)")


def read_image(path: str | Path, page: int = 0) -> np.ndarray:
    """Decode one slice to a (y, x) uint8/uint16 array; corrupt or truncated files raise SourceError.

    A URL is read in one request and decoded in memory (:mod:`emflow.io.remote`)."""
    if is_url(path):
        from emflow.io import remote

        return remote.read_image(str(path), page)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                arr = tif.pages[page].asarray()
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(
                f"{path} (page {page}) could not be decoded ({first_line}): the file is "
                f"corrupt or truncated; {_DAMAGED}"
            ) from None
        return arr
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SourceError(f"{path} could not be read ({exc.strerror})") from None
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None or (suffix == ".png" and not _png_complete(data)):
        raise SourceError(
            f"{path} could not be decoded: the file is corrupt or truncated; {_DAMAGED}"
        )
    if arr.ndim == 3:  # greyscale + alpha PNG
        arr = arr[..., 0]
    return arr


def _png_complete(data: np.ndarray) -> bool:
    """True if a PNG byte string ends with its IEND chunk (libpng may decode truncated files)."""
    return data.size >= 12 and data[-8:-4].tobytes() == b"IEND"
