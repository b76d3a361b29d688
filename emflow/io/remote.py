"""Source slices at URLs (s3://, gs://, http(s)://): headers by byte range, slices read whole.

Discovery reads only headers, with ranged requests: a PNG's first 33 bytes (and its last 12,
to catch a truncated upload), a JPEG's segments up to its frame header, a TIFF's header and
image file directory (one more request per page of a multi-page file). A slice is read in
one request and decoded in memory (OpenCV for PNG/JPEG, tifffile for TIFF); a page of an
uncompressed multi-page TIFF is read as its own byte range. All I/O goes through
tensorstore's kvstores (:class:`~emflow.io.location.Location`), so credentials, retries
and endpoints are those of the rest of the run.
"""

from __future__ import annotations

import fnmatch
import io
import struct
from dataclasses import dataclass

import numpy as np

from emflow.errors import OutputError, SourceError
from emflow.io.location import Location, StoreAccessError, StoreUnavailable, is_url

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BLOCK = 64 * 1024  # ranged reads fetch at least this much (fewer requests for TIFF IFDs)


class _Ranges:
    """Reads byte ranges of one object, in blocks, remembering what it fetched."""

    def __init__(self, url: str) -> None:
        self.url = url
        loc = Location.of(url)
        self.folder, self.key = loc.parent, loc.name
        self.blocks: dict[int, bytes] = {}
        self.size: int | None = None  # known once a read came back short

    def _block(self, i: int) -> bytes:
        got = self.blocks.get(i)
        if got is None:
            got = _source(lambda: self.folder.read_range(self.key, i * _BLOCK, (i + 1) * _BLOCK))
            if got is None:
                raise SourceError(f"{self.url} does not exist")
            if len(got) < _BLOCK:
                self.size = i * _BLOCK + len(got)
            self.blocks[i] = got
        return got

    def read(self, start: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``start`` (fewer at the end of the object)."""
        out = bytearray()
        pos = start
        while len(out) < n:
            i, off = divmod(pos, _BLOCK)
            block = self._block(i)
            piece = block[off : off + n - len(out)]
            if not piece:
                break
            out += piece
            pos += len(piece)
            if len(block) < _BLOCK:
                break
        return bytes(out)

    def exact(self, start: int, n: int, what: str) -> bytes:
        data = self.read(start, n)
        if len(data) < n:
            raise SourceError(f"{self.url} is truncated ({what} runs past its end); {_DAMAGED}")
        return data

    def tail(self, n: int) -> bytes:
        got = _source(lambda: self.folder.read_range(self.key, -n, None))
        if got is None:
            raise SourceError(f"{self.url} does not exist")
        return got


_DAMAGED = "re-export it, or remove it and set source.missing to fill its place"


def _source(fn):
    try:
        return fn()
    except StoreAccessError as exc:
        raise SourceError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TiffPage:
    """What a TIFF page's image file directory says (enough to read an uncompressed page)."""

    shape_yx: tuple[int, int]
    dtype: str
    compression: int
    samples: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    next_ifd: int


_TIFF_TYPES = {1: "B", 2: "B", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 16: "Q", 17: "q"}


def _tiff_ifds(r: _Ranges, max_pages: int | None = None) -> tuple[str, list[TiffPage]]:
    """Byte order and the pages of a TIFF (classic or BigTIFF), following the IFD chain."""
    head = r.exact(0, 16, "header")
    if head[:2] not in (b"II", b"MM"):
        raise SourceError(f"{r.url} is not a TIFF file (bad header); {_DAMAGED}")
    e = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(e + "H", head[2:4])[0] == 43
    off = struct.unpack(e + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    count_fmt, entry, count_size, next_size = ("Q", 20, 8, 8) if big else ("H", 12, 2, 4)
    pages: list[TiffPage] = []
    seen: set[int] = set()
    while off and (max_pages is None or len(pages) < max_pages):
        if off in seen:
            raise SourceError(f"{r.url}: its pages form a loop; {_DAMAGED}")
        seen.add(off)
        n = struct.unpack(e + count_fmt, r.exact(off, count_size, "a page directory"))[0]
        ifd = r.exact(off + count_size, n * entry + next_size, "a page directory")
        tags: dict[int, tuple[int, ...]] = {}
        for i in range(n):
            t = ifd[i * entry : (i + 1) * entry]
            code, typ = struct.unpack(e + "HH", t[:4])
            cnt = struct.unpack(e + ("Q" if big else "I"), t[4:12] if big else t[4:8])[0]
            raw = t[12:20] if big else t[8:12]
            fmt = _TIFF_TYPES.get(typ)
            if fmt is None or code not in (256, 257, 258, 259, 273, 277, 279, 339, 322, 324):
                continue
            size = struct.calcsize(fmt) * cnt
            if size > len(raw):  # stored elsewhere: raw holds its offset
                at = struct.unpack(e + ("Q" if big else "I"), raw[: 8 if big else 4])[0]
                raw = r.exact(at, size, "a page directory")
            tags[code] = struct.unpack(e + fmt * cnt, raw[:size])
        off = struct.unpack(e + ("Q" if big else "I"), ifd[n * entry : n * entry + next_size])[0]
        if 322 in tags or 324 in tags:
            offsets, counts = (), ()  # tiled: read whole
        else:
            offsets, counts = tags.get(273, ()), tags.get(279, ())
        bits = tags.get(258, (1,))[0]
        fmt_code = tags.get(339, (1,))[0]
        dtype = {(8, 1): "uint8", (16, 1): "uint16"}.get((bits, fmt_code), f"{bits}-bit")
        pages.append(
            TiffPage(
                (int(tags.get(257, (0,))[0]), int(tags.get(256, (0,))[0])),
                dtype,
                int(tags.get(259, (1,))[0]),
                int(tags.get(277, (1,))[0]),
                tuple(int(v) for v in offsets),
                tuple(int(v) for v in counts),
                off,
            )
        )
    return e, pages


def _header(url: str, pages: int, shape_yx: tuple[int, int], dtype: str):
    from emflow.io.readers import ImageHeader

    return ImageHeader(url, pages, shape_yx, dtype)


def read_header(url: str):
    """Pages, (y, x) shape and dtype of the image at ``url``, from ranged reads only."""
    suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    r = _Ranges(url)
    if suffix == ".png":
        head = r.read(0, 33)
        if not head:
            raise SourceError(f"{url} is empty (0 bytes); {_DAMAGED}")
        if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise SourceError(f"{url} is not a PNG file (bad header); {_DAMAGED}")
        if r.size is not None and r.size <= _BLOCK:
            tail = r.read(max(0, r.size - 12), 12)
        else:
            tail = r.tail(12)
        if tail[4:8] != b"IEND":
            raise SourceError(f"{url} is truncated (no PNG end marker); {_DAMAGED}")
        width, height, bit_depth, colour = struct.unpack(">IIBB", head[16:26])
        if colour not in (0, 4):
            raise SourceError(
                f"{url} is a colour PNG (colour type {colour}); emflow ingests greyscale EM "
                "slices: convert the stack to 8- or 16-bit greyscale"
            )
        if bit_depth not in (8, 16):
            raise SourceError(
                f"{url} has {bit_depth}-bit pixels; emflow reads 8- and 16-bit images"
            )
        return _header(url, 1, (height, width), "uint8" if bit_depth == 8 else "uint16")
    if suffix in (".jpg", ".jpeg"):
        return _header(url, 1, *_jpeg_frame(r))
    if suffix in (".tif", ".tiff"):
        _, pages = _tiff_ifds(r)
        if not pages:
            raise SourceError(f"{url} holds no TIFF page; {_DAMAGED}")
        first = pages[0]
        if first.samples != 1:
            raise SourceError(
                f"{url}: pages have {first.samples} samples per pixel; emflow reads greyscale "
                "(y, x) pages: convert colour TIFFs to greyscale"
            )
        if first.dtype not in ("uint8", "uint16"):
            raise SourceError(f"{url} holds {first.dtype} pixels; emflow reads uint8 and uint16")
        return _header(url, len(pages), first.shape_yx, first.dtype)
    raise SourceError(f"{url}: unsupported image type '{suffix}' (use PNG, TIFF or JPEG)")


def _jpeg_frame(r: _Ranges) -> tuple[tuple[int, int], str]:
    """(y, x) shape and dtype from a JPEG's start-of-frame segment (walking the segments)."""
    if r.read(0, 2) != b"\xff\xd8":
        raise SourceError(f"{r.url} is not a JPEG file (bad header); {_DAMAGED}")
    pos = 2
    while True:
        marker = r.exact(pos, 4, "a JPEG segment")
        if marker[0] != 0xFF:
            raise SourceError(f"{r.url} is not a readable JPEG file (bad segment); {_DAMAGED}")
        kind = marker[1]
        length = struct.unpack(">H", marker[2:4])[0]
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE):
            sof = r.exact(pos + 4, 6, "the JPEG frame header")
            bits, height, width, comps = struct.unpack(">BHHB", sof)
            if comps != 1:
                raise SourceError(
                    f"{r.url} is a colour JPEG; emflow ingests greyscale EM slices: convert to "
                    "greyscale"
                )
            return (height, width), "uint8" if bits == 8 else f"{bits}-bit"
        pos += 2 + length


# ---------------------------------------------------------------------------------------
# slices
# ---------------------------------------------------------------------------------------
def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (one request)."""
    loc = Location.of(url)
    data = _source(lambda: loc.parent.read(loc.name))
    if data is None:
        raise SourceError(f"{url} does not exist (it was there when the stack was discovered)")
    return data


def read_image(url: str, page: int = 0) -> np.ndarray:
    """Decode one slice at ``url`` to a (y, x) uint8/uint16 array, in memory."""
    import cv2

    suffix = url.rsplit(".", 1)[-1].lower()
    if suffix in ("tif", "tiff"):
        if page > 0:  # a page of a multi-page file: its own bytes if uncompressed
            arr = _uncompressed_page(url, page)
            if arr is not None:
                return arr
        return _decode_tiff(url, read_bytes(url), page)
    data = np.frombuffer(read_bytes(url), np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    png_ok = suffix != "png" or (data.size >= 12 and data[-8:-4].tobytes() == b"IEND")
    if arr is None or not png_ok:
        raise SourceError(
            f"{url} could not be decoded: the file is corrupt or truncated; {_DAMAGED}"
        )
    return arr[..., 0] if arr.ndim == 3 else arr


def _decode_tiff(url: str, data: bytes, page: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return tif.pages[page].asarray()
    except Exception as exc:
        if "imagecodecs" in str(exc):  # e.g. LZW without imagecodecs: OpenCV decodes it
            import cv2

            ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if ok and page < len(pages):
                return pages[page]
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(
            f"{url} (page {page}) could not be decoded ({first}): the file is corrupt or "
            f"truncated; {_DAMAGED}"
        ) from None


def _uncompressed_page(url: str, page: int) -> np.ndarray | None:
    r = _Ranges(url)
    e, pages = _tiff_ifds(r, max_pages=page + 1)
    if page >= len(pages):
        raise SourceError(f"{url} has {len(pages)} page(s); page {page} is missing")
    p = pages[page]
    if p.compression != 1 or p.samples != 1 or not p.offsets or p.dtype not in ("uint8", "uint16"):
        return None
    start, stop = min(p.offsets), max(o + c for o, c in zip(p.offsets, p.counts, strict=False))
    if stop - start != sum(p.counts):  # strips not back to back
        return None
    loc = Location.of(url)
    data = _source(lambda: loc.parent.read_range(loc.name, start, stop))
    dtype = np.dtype(p.dtype).newbyteorder(e)
    ny, nx = p.shape_yx
    if data is None or len(data) < ny * nx * dtype.itemsize:
        raise SourceError(f"{url} is truncated (page {page}); {_DAMAGED}")
    return np.frombuffer(data, dtype, ny * nx).reshape(ny, nx).astype(p.dtype)


# ---------------------------------------------------------------------------------------
# listing, existence, versions
# ---------------------------------------------------------------------------------------
def _first_byte(url: str):
    from emflow.io.location import store_error

    loc = Location.of(url)
    folder = loc.parent
    try:
        return folder.store().read(loc.name, byte_range=slice(0, 1)).result()
    except ValueError as exc:
        if "OUT_OF_RANGE" in str(exc):  # an empty object
            return folder.store().read(loc.name).result()
        raise _source_error(store_error(exc, folder, f"read {loc.name}")) from None


def _source_error(exc: Exception) -> Exception:
    return SourceError(str(exc)) if isinstance(exc, StoreAccessError) else exc


def exists(url: str) -> bool:
    """True when an object is at ``url`` (one ranged request; works where listing does not)."""
    return _first_byte(url).state == "value"


def generation(url: str) -> str:
    """The object's version as the store reports it (ETag, GCS generation): what a source
    fingerprint records instead of size and modification time."""
    got = _first_byte(url)
    if got.state != "value":
        raise SourceError(f"{url} does not exist (it was there when the stack was discovered)")
    return bytes(got.stamp.generation).hex()


def list_files(folder_url: str, pattern: str | None = None) -> list[str]:
    """URLs of the objects directly inside ``folder_url`` (not in sub-folders) whose names
    match the glob ``pattern`` (every object when None)."""
    folder = Location.of(folder_url)
    try:
        keys = _source(folder.list)
    except StoreUnavailable:
        raise
    except OutputError as exc:  # e.g. plain HTTP cannot list: a source problem
        raise SourceError(str(exc)) from None
    names = [k for k in keys if "/" not in k]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [folder.child(n).url for n in names]


def split_glob(url: str) -> tuple[str, str]:
    """``s3://b/raw/*.png`` → (``s3://b/raw``, ``*.png``); wildcards only in the last part."""
    head, _, name = url.rstrip("/").rpartition("/")
    if any(c in head.partition("://")[2] for c in "*?["):
        raise SourceError(
            f"source.glob '{url}': wildcards only in the file name part of a URL "
            "(e.g. s3://bucket/stack/*.png)"
        )
    return head, name


__all__ = [
    "exists",
    "generation",
    "is_url",
    "list_files",
    "read_bytes",
    "read_header",
    "read_image",
    "split_glob",
]
