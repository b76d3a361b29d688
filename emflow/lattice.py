"""Per-unit bookkeeping (the lattice). MINIMAL STUB written by the lead; the lattice engineer owns and replaces it."""

from __future__ import annotations

import json
from pathlib import Path

from emflow.errors import OutputError


def open_run(run_dir: Path, fingerprint: str, *, restart: bool) -> bool:
    """Prepare the run folder; return True when an earlier run of the same recipe is resumed."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if run_json.exists() and not restart:
        old = json.loads(run_json.read_text()).get("fingerprint")
        if old != fingerprint:
            raise OutputError(
                f"{run_dir.parent} holds output of a different recipe (fingerprint {old} != {fingerprint}); "
                "use --restart to overwrite it, or choose another output_dir"
            )
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    run_json.write_text(json.dumps({"fingerprint": fingerprint}))
    return False
