"""Reading the saved features of a slice (``features/z<z>.npz``), with a small per-process cache.

A slice's file is read by up to ~8 units (2 match, 2 or more match2, ~4 qc) and the units of
a stage run along z, so a worker often reads a file one of its units has just read. A whole
read of a 2048² slice's file (4000 keypoints: 1.0 MB, descriptors as bytes) costs ~2 ms of CPU
(a fresh copy of its bytes, a zip CRC-32 over each member, a fresh array), its area copy alone
~0.6 ms.

The cache keeps the arrays read from local files, by path, for as long as the file's zip
directory is unchanged: every member's name, size and CRC-32, which the reader takes from the
file at each call (~0.1 ms). A file rewritten with other content (a rerun, another run in the
same process, e.g. a notebook) is therefore read again, whatever its timestamps or inode.
Arrays handed out are read-only (shared between the units of a worker and its threads).
Least recently used files go first; the arrays kept never exceed :data:`KEEP_BYTES` per
process (16 MiB: ~15 whole 2048² files, or ~60 area copies of 512²; with float32 descriptors,
~6 files: then the units of the 2048² x 32 benchmark on two threads of one process read 36
whole files instead of 62 and ~29 area copies instead of 182). Files at a URL (a bucket's run
folder) are read whole at each call, as before, and not kept.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from emflow.io.location import get_bytes, is_url

__all__ = ["KEEP_BYTES", "forget", "kept_bytes", "read_arrays"]

#: At most this many bytes of arrays are kept per process.
KEEP_BYTES = 16 << 20

# path -> (zip directory key, {member: read-only array}, their bytes); least recently used first
_KEPT: OrderedDict[str, tuple[tuple, dict[str, np.ndarray], int]] = OrderedDict()
_LOCK = threading.Lock()  # a worker's threads share the cache


def read_arrays(
    path: str,
    want: Callable[[frozenset[str]], Iterable[str]],
    *,
    keep: bool = True,
) -> dict[str, np.ndarray]:
    """The arrays of a saved ``.npz`` that ``want(names in the file)`` names (those present).

    Local files: from the cache when the file's zip directory is unchanged, read otherwise;
    ``keep`` False reads without adding to the cache (e.g. the driver's thumbnails). The
    arrays are read-only. Raises FileNotFoundError when there is no file.
    """
    if is_url(path):
        data = get_bytes(path)
        if data is None:
            raise FileNotFoundError(f"features {path} are missing")
        with np.load(io.BytesIO(data)) as d:
            names = frozenset(d.files)
            return {k: _frozen(d[k]) for k in want(names) if k in names}
    try:
        d = np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"features {path} are missing") from None
    with d:
        key = tuple((i.filename, i.file_size, i.CRC) for i in d.zip.infolist())
        names = frozenset(d.files)
        with _LOCK:
            entry = _KEPT.get(path)
            have = dict(entry[1]) if entry is not None and entry[0] == key else {}
        out, new = {}, {}
        for k in want(names):
            if k not in names:
                continue
            a = have.get(k)
            if a is None:
                a = new[k] = _frozen(d[k])
            out[k] = a
    if keep and new:
        _keep(path, key, new)
    elif have:  # a hit: now the most recently used
        with _LOCK:
            if path in _KEPT:
                _KEPT.move_to_end(path)
    return out


def forget() -> None:
    """Empty this process's cache."""
    with _LOCK:
        _KEPT.clear()


def kept_bytes() -> int:
    """Bytes of arrays the cache holds now."""
    with _LOCK:
        return sum(e[2] for e in _KEPT.values())


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _keep(path: str, key: tuple, new: dict[str, np.ndarray]) -> None:
    """Add arrays read from ``path`` (zip directory ``key``) and drop the least recently used
    files while the cache holds more than :data:`KEEP_BYTES`."""
    with _LOCK:
        entry = _KEPT.pop(path, None)
        arrays = dict(entry[1]) if entry is not None and entry[0] == key else {}
        arrays.update(new)
        size = sum(a.nbytes for a in arrays.values())
        if size > KEEP_BYTES:
            return
        _KEPT[path] = (key, arrays, size)
        total = sum(e[2] for e in _KEPT.values())
        while total > KEEP_BYTES:
            _, (_, _, dropped) = _KEPT.popitem(last=False)
            total -= dropped
