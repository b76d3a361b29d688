"""User-facing errors.

Every error a user can cause is an :class:`EmflowError` subclass whose message
names the file or recipe field at fault and says what to do. The CLI prints the
message on one line (no traceback) and exits with code 2.
"""

from __future__ import annotations


class EmflowError(Exception):
    """Base class of every error emflow reports to a user (CLI exit code 2)."""

    exit_code = 2


class RecipeError(EmflowError):
    """The recipe file is missing, unparsable, or a field has a bad value."""


class SourceError(EmflowError):
    """Source slices are missing, unreadable, corrupt or inconsistent."""


class AlignmentError(EmflowError):
    """Alignment could not be computed or an alignment file is invalid."""


class OutputError(EmflowError):
    """The output location cannot be written, or holds an incompatible volume."""


class ClusterError(EmflowError):
    """A cluster could not be configured or reached."""
