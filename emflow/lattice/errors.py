"""Errors a lattice-tracked run raises at its end: :class:`IncompleteRun` and :class:`RunCancelled`.

Both carry the failed units (``stage``, ``index``, ``attempts``, ``error``) and point to
the run folder's journal; the run stays resumable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emflow.errors import EmflowError
from emflow.lattice.journal import JOURNAL


class IncompleteRun(EmflowError):
    """Some units still failed after their retries; the output is incomplete but resumable."""

    exit_code = 3

    def __init__(self, message: str, failed: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.failed = failed or []

    @classmethod
    def from_failures(cls, failed: list[dict[str, Any]], run_dir: Path | None) -> IncompleteRun:
        shown = "; ".join(
            f"{f['stage']}[{f['index']}] after {f['attempts']} attempt(s): {f['error']}"
            for f in failed[:5]
        )
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        where = f" (see {Path(run_dir) / JOURNAL})" if run_dir else ""
        return cls(
            f"run incomplete: {len(failed)} unit(s) failed: {shown}{more}{where}; "
            "fix the cause and run again to redo only the missing units",
            failed,
        )


class RunCancelled(IncompleteRun):
    """The run was cancelled (``emflow cancel``); units already done stay done and resumable."""
