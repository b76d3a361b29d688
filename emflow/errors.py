"""User-facing errors and the exit codes every command keeps.

Every error a user can cause is an :class:`EmflowError` subclass whose message
names the file, recipe field or path at fault and says what to do. The CLI
prints it as one line (no traceback) and exits with its ``exit_code``:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     done: every output is complete
1     internal error (a bug): the traceback is in the run folder's ``run.log``
2     bad input or refused: recipe, sources, alignment file, cluster config or
      output location is wrong (nothing written when refused before the run)
3     incomplete but resumable: units failed (listed), disk full, cancelled;
      fix the cause and run the same command again
130   interrupted (Ctrl-C); run the same command to resume
====  ==========================================================================

:func:`deterministic` tells errors that would fail the same way again (bad input,
no space, no permission: never retried) from transient ones (a lost worker, a
timeout: retried).
"""

from __future__ import annotations

import errno
import re

EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130

INTERRUPTED_MESSAGE = "interrupted; run the same command to resume"


class EmflowError(Exception):
    """Base class of every error emflow reports to a user (CLI exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(EmflowError):
    """The recipe file is missing, unparsable, or a field has a bad value."""


class SourceError(EmflowError):
    """Source slices are missing, unreadable, corrupt or inconsistent."""


class AlignmentError(EmflowError):
    """Alignment could not be computed or an alignment file is invalid."""


class OutputError(EmflowError):
    """The output location cannot be written, or holds data emflow did not write."""


class NoSpaceError(OutputError):
    """The disk filled up (or a quota was reached) while writing: resumable once space is freed."""

    exit_code = EXIT_INCOMPLETE

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def no_space(path: object = None) -> NoSpaceError:
    """The one-line error for a full disk or quota (``path``: what was being written, if known)."""
    where = f" writing {path}" if path else ""
    return NoSpaceError(
        f"no space left on the device{where}: free some space (or choose another output_dir) "
        "and run the same command to resume",
        str(path) if path else None,
    )


class UnsafeEnvironment(EmflowError):
    """The environment would make a library print credentials (refused, exit 2)."""


class ClusterError(EmflowError):
    """A cluster could not be configured or reached."""


class SchedulerLost(ClusterError):
    """The Dask scheduler went away mid-run (killed, its pod or job gone): resumable."""

    exit_code = EXIT_INCOMPLETE


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
# tensorstore reports OS errors as ValueError('... "path" ...: reason [os_error_code=\'28\']')
_TS_CODE = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'(?:local file|Failed writing:|directory:) "([^"]+)"')


def _os_error(exc: BaseException) -> tuple[int | None, str | None]:
    """(errno, path) of an OS-level failure, from an OSError or a tensorstore error text."""
    if isinstance(exc, OSError):
        return exc.errno, exc.filename
    text = str(exc)
    m = _TS_CODE.search(text)
    if m is None:
        return None, None
    p = _TS_PATH.search(text)
    path = p.group(1).split("\\x00")[0].removesuffix(".__lock") if p else None
    return int(m.group(1)), path


def deterministic(exc: BaseException) -> EmflowError | None:
    """The one-line error for a failure that would recur on retry, or None if it may be transient.

    Bad input (any :class:`EmflowError`) is returned as is; a full disk or quota becomes
    :class:`NoSpaceError` (exit 3: resumable), a permission or read-only file system error
    :class:`OutputError`, each naming the path. Anything else (a lost worker, a timeout,
    a bug) returns None and is retried.
    """
    if isinstance(exc, EmflowError):
        return exc
    if "CURL error" in str(exc) or "http_response_code=" in str(exc) or "NoSuchBucket" in str(exc):
        from emflow.io.location import classify  # an object store (after its bounded retries)

        store = classify(exc)
        if store is not None:
            return store
    code, path = _os_error(exc)
    where = f" writing {path}" if path else ""
    if code in _NO_SPACE:
        return no_space(path)
    if code in _NO_PERMISSION:
        why = "the file system is read-only" if code == errno.EROFS else "permission denied"
        return OutputError(
            f"cannot write{where or ' the output'} ({why}); choose an output_dir you can write to"
        )
    return None
