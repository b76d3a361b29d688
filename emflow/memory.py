"""Process-level memory hygiene for workers (no Dask here).

Units run in threads, and tensorstore encodes in threads of its own; glibc gives each
thread its own malloc arena (up to 8 per core), and memory freed in one arena is not
reused by another, so a worker's resident memory grows unit after unit far beyond what a
unit allocates (measured: 1.2 GiB after 14 units of 64 MiB bricks, 0.67 GiB with two
arenas). With two arenas the 16384² x 32 TIFF run (256 units of 1024² x 64, 2 threads) still
crept from 540 to 870 MiB anonymous: at a unit's end the heaps held 500-700 MiB of which
only 150-225 MiB were in use (mallinfo2) -- each arena keeps its own holes between
tensorstore's chunk-sized buffers. One arena reuses them: peak worker RSS 918-956 -> 637-651
MB, flat after the first units, same CPU (2 runs each; 2048² both formats: 6 alternating
pairs, CPU 1.00x, futex calls 77.6k vs 76.3k). :func:`limit_malloc_arenas` caps the arenas
at run time; workers started by emflow also get ``MALLOC_ARENA_MAX`` in their environment
(:data:`WORKER_ENV`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: environment for worker processes emflow starts (glibc reads it at process start)
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
#: malloc thresholds for the workers emflow starts (local, batch jobs, pods), set after Dask's
#: nanny defaults.
#: Dask sets ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold at
#: 128 KiB: every buffer above it (tensorstore's 256 KiB chunk buffers, encoded chunks,
#: downsample bands) is then a fresh mapping that the kernel zeroes page by page, and freed
#: heap tops go back to the kernel at once. Buffers below 32 MiB come from the (one) arena
#: instead and are reused unit after unit (2048² both-formats run: 0.92× CPU, sys 4.9 → 3.9 s).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_M_ARENA_MAX = -8  # glibc mallopt parameter
_done = False


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas of this process (threads created later share them); idempotent.

    Returns False where there is no glibc (macOS, musl): nothing to do there.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


_no_huge = False


def no_huge_page_advice() -> bool:
    """Stop numpy asking the kernel for transparent huge pages for its large arrays; idempotent.

    numpy advises ``MADV_HUGEPAGE`` for every array of 4 MiB or more; where THP defrag is
    ``madvise`` (a common default) each such fresh allocation may stall in direct compaction.
    A unit touches its arrays once or twice, so huge pages save it little and cost it much:
    the 2048² both-formats run spent 5.7 s of kernel time with them and 3.7 s without (3
    paired runs, CPU 0.87×). Same as ``NUMPY_MADVISE_HUGEPAGE=0``, but at run time. Returns
    False where this numpy has no such switch.
    """
    global _no_huge
    if _no_huge:
        return True
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    _no_huge = True
    return True
