"""Image discovery: turn a recipe's source into a :class:`SliceCatalog` (headers only).

The catalog maps every output z (0..n-1) to one source slice (file and page)
or to a fill rule for a missing slice. Files are sorted naturally
(``img2`` before ``img10``); a multi-page TIFF contributes one slice per page.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emflow.errors import SourceError
from emflow.io.location import is_url
from emflow.io.readers import IMAGE_SUFFIXES, ImageHeader, read_header

if TYPE_CHECKING:  # annotations only: workers unpickle SliceRef from here, without pydantic
    from emflow.recipe import Recipe, Source


@dataclass(frozen=True)
class SliceRef:
    """One z of the stack: a file and page, or a fill for a missing slice.

    ``fill`` is ``None`` for a real slice, ``"zero"`` for a black slice, or
    ``"previous"`` (then ``path``/``page`` name the slice that is repeated).
    ``source_z`` is the z the user's numbering gives the slice (pattern z or index).
    """

    z: int
    source_z: int
    path: str | None
    page: int = 0
    fill: str | None = None


@dataclass(frozen=True)
class SliceCatalog:
    """The discovered stack: slices in z order, their common (y, x) shape and dtype."""

    slices: tuple[SliceRef, ...]
    shape_yx: tuple[int, int]
    dtype: str
    missing: tuple[int, ...]  # source z numbers that had no file

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (len(self.slices), *self.shape_yx)

    @property
    def nbytes(self) -> int:
        return (
            len(self.slices)
            * self.shape_yx[0]
            * self.shape_yx[1]
            * (2 if self.dtype == "uint16" else 1)
        )

    def summary(self) -> str:
        z, y, x = self.shape_zyx
        files = len({s.path for s in self.slices if s.path and s.fill is None})
        real = [s for s in self.slices if s.fill is None]
        first = real[0].path if real else "-"
        last = real[-1].path if real else "-"
        lines = [
            f"slices: {z} (x {x} × y {y} px, {self.dtype}), {files} file(s), "
            f"{self.nbytes / 1e9:.3f} GB of voxels",
            f"first: {first}",
            f"last:  {last}",
        ]
        if self.missing:
            lines.append(f"missing source z: {_ranges(self.missing)} (filled per source.missing)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from emflow.reprs import catalog_html

        return catalog_html(self)


def _ranges(values: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for v in sorted(values):
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically ('img2' < 'img10')."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in _NUM.split(name))


def _suffix(path: str) -> str:
    """The lower-case suffix of a path or URL's last part ('' if none)."""
    return Path(path.rsplit("/", 1)[-1]).suffix.lower()


def _last_number(path: str) -> int | None:
    nums = _NUM.findall(Path(path).stem)
    return int(nums[-1]) if nums else None


def _broken_links(paths: Sequence[str]) -> None:
    """Refuse image names that are symbolic links pointing nowhere or in a loop (else silently skipped)."""
    for p in paths:
        if Path(p).suffix.lower() in IMAGE_SUFFIXES and os.path.islink(p) and not os.path.exists(p):
            raise SourceError(
                f"{p} is a symbolic link that points nowhere or loops back on itself; fix the link "
                "or remove it"
            )


def _present(paths: Sequence[str]) -> list[bool]:
    """Which of ``paths`` are files (local) or objects (URLs: one ranged request each)."""
    if not any(is_url(p) for p in paths):
        return [os.path.isfile(p) for p in paths]
    from emflow.io import remote

    def one(p: str) -> bool:
        return remote.exists(p) if is_url(p) else os.path.isfile(p)

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        return list(pool.map(one, paths))


def _headers(paths: Sequence[str]) -> list[ImageHeader]:
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        return list(pool.map(read_header, paths))


def _check_consistent(headers: Sequence[ImageHeader]) -> tuple[tuple[int, int], str]:
    first = headers[0]
    for h in headers[1:]:
        if h.shape_yx != first.shape_yx:
            raise SourceError(
                f"{h.path} is {h.shape_yx[1]} × {h.shape_yx[0]} px but {first.path} is "
                f"{first.shape_yx[1]} × {first.shape_yx[0]} px: all slices must have one size "
                "(pad or crop them, or narrow the z range)"
            )
        if h.dtype != first.dtype:
            raise SourceError(
                f"{h.path} is {h.dtype} but {first.path} is {first.dtype}: all slices must have "
                "one bit depth"
            )
    return first.shape_yx, first.dtype


def _apply_missing(
    present: dict[int, tuple[str, int]], wanted: Sequence[int], policy: str, what: str
) -> tuple[list[SliceRef], tuple[int, ...]]:
    missing = tuple(z for z in wanted if z not in present)
    if missing and policy == "error":
        raise SourceError(
            f"{len(missing)} slice(s) missing from {what}: source z {_ranges(missing)}; add the "
            "files, narrow z_start/z_stop, or set source.missing to fill_zero or fill_previous"
        )
    refs: list[SliceRef] = []
    prev: SliceRef | None = None
    for i, sz in enumerate(wanted):
        if sz in present:
            path, page = present[sz]
            prev = SliceRef(i, sz, path, page)
            refs.append(prev)
        elif policy == "fill_previous" and prev is not None:
            refs.append(SliceRef(i, sz, prev.path, prev.page, fill="previous"))
        else:
            refs.append(SliceRef(i, sz, None, 0, fill="zero"))
    return refs, missing


def discover(source: Source, base_dir: str | Path = ".") -> SliceCatalog:
    """Find the slices a :class:`~emflow.recipe.Source` names and read their headers."""
    base = Path(base_dir)

    def resolve(p: str) -> Path | str:
        if is_url(p):  # s3://, gs://, http(s)://: taken as written
            return p
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    if source.pattern is not None:
        pattern = str(resolve(source.pattern))
        wanted = list(range(source.z_start or 0, source.z_stop or 0))
        try:
            candidates = {z: pattern % z for z in wanted}
        except (TypeError, ValueError) as exc:
            raise SourceError(
                f"source.pattern '{source.pattern}' is not a valid printf pattern ({exc})"
            ) from None
        _broken_links(list(candidates.values()))
        present = _present(list(candidates.values()))
        found = {z: p for (z, p), ok in zip(candidates.items(), present, strict=True) if ok}
        if not found:
            raise SourceError(
                f"no file matches source.pattern '{pattern}' for z {wanted[0]}..{wanted[-1]}: "
                "check the pattern, its directory and the z range"
            )
        headers = dict(zip(found, _headers(list(found.values())), strict=True))
        shape, dtype = _check_consistent(list(headers.values()))
        present = {z: (p, 0) for z, p in found.items()}
        refs, missing = _apply_missing(present, wanted, source.missing, f"'{source.pattern}'")
        return SliceCatalog(tuple(refs), shape, dtype, missing)

    if source.glob is not None and is_url(source.glob):
        from emflow.io import remote

        what = f"source.glob '{source.glob}'"
        paths = remote.list_files(*remote.split_glob(source.glob))
        paths = [p for p in paths if _suffix(p) in IMAGE_SUFFIXES]
    elif source.directory is not None and is_url(source.directory):
        from emflow.io import remote

        what = f"source.directory '{source.directory}'"
        paths = [p for p in remote.list_files(source.directory) if _suffix(p) in IMAGE_SUFFIXES]
    elif source.glob is not None:
        what = f"source.glob '{source.glob}'"
        matches = globlib.glob(str(resolve(source.glob)))
        _broken_links(matches)
        paths = [p for p in matches if os.path.isfile(p)]
        paths = [p for p in paths if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    else:
        directory = resolve(source.directory or ".")
        what = f"source.directory '{directory}'"
        if not directory.is_dir():
            raise SourceError(f"{what} does not exist or is not a directory")
        try:
            entries = [str(p) for p in directory.iterdir()]
        except OSError as exc:
            raise SourceError(f"{what} cannot be listed ({exc.strerror or exc})") from None
        _broken_links(entries)
        paths = [
            p for p in entries if Path(p).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(p)
        ]
    if not paths:
        raise SourceError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) match {what}: check the path and extension"
        )
    paths.sort(key=natural_key)
    headers = _headers(paths)
    shape, dtype = _check_consistent(headers)
    # every page is a slice; z counts from 0 in natural order
    pages = [(h.path, k) for h in headers for k in range(h.pages)]
    numbers = [_last_number(p) for p in paths]
    single_page = all(h.pages == 1 for h in headers)
    if single_page and all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        # numbered files: gaps in the numbering are missing slices
        numbered = dict(zip(numbers, pages, strict=True))
        lo, hi = min(numbered), max(numbered) + 1
        z0 = lo if source.z_start is None else source.z_start
        z1 = hi if source.z_stop is None else source.z_stop
        wanted = list(range(z0, z1))
        if not any(z in numbered for z in wanted):
            raise SourceError(
                f"no slice of {what} lies in z {z0}..{z1 - 1} (files are numbered {lo}..{hi - 1})"
            )
        refs, missing = _apply_missing(numbered, wanted, source.missing, what)
        return SliceCatalog(tuple(refs), shape, dtype, missing)
    z0 = source.z_start or 0
    z1 = len(pages) if source.z_stop is None else min(source.z_stop, len(pages))
    if z1 <= z0:
        raise SourceError(f"{what} has {len(pages)} slice(s); the z range {z0}..{z1} selects none")
    refs = [SliceRef(i, z0 + i, p, k) for i, (p, k) in enumerate(pages[z0:z1])]
    return SliceCatalog(tuple(refs), shape, dtype, ())


def discover_recipe(recipe: Recipe) -> SliceCatalog:
    """Discover the slices of a recipe (relative paths resolve from the recipe's directory)."""
    return discover(recipe.source, recipe.base_dir)
