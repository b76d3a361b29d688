"""Open or create the volumes a run writes, on every run, so a run can continue from any point.

A run may die anywhere: before its output volumes exist, halfway through creating
them, between slabs, in a coarse pass, halfway through finalizing. On every start
:func:`open_volumes` decides, per volume (an output writer, or a hand-off copy in the
run folder), whether it can be opened as it is or must be created, from a record in
the run folder (``outputs.json``: the plan's fingerprint and the volumes created under
it). A volume that is (re)created loses whatever its writing units had put there, so
their done markers are dropped too and those units run again; units of other stages
keep theirs. Nothing here imports Dask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from emflow.lattice.markers import MARKERS, OUTPUTS_JSON, read_marker, write_marker


def plan_fingerprint(plan: Any, recipe_fingerprint: str = "") -> str:
    """sha256 of everything that fixes where units write: levels, passes (blocks), ownership,
    and the recipe's output fingerprint."""
    text = recipe_fingerprint + json.dumps(dataclasses.asdict(plan), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(run_dir: Path) -> dict[str, Any]:
    rec = read_marker(run_dir / OUTPUTS_JSON)
    return rec if rec is not None else {}


def _save(run_dir: Path, plan_fp: str, created: dict[str, bool]) -> None:
    write_marker(run_dir / OUTPUTS_JSON, {"plan": plan_fp, "created": created, "result": None})


def open_volumes(
    run_dir: Path,
    plan: Any,
    writers: Sequence[Any],
    handoffs: Sequence[tuple[Any, str]],
    *,
    stages: Sequence[str],
    finalized: Iterable[str] = (),
    root: Path | None = None,
    fingerprint: str = "",
) -> list[str]:
    """Open the run's volumes where they exist as this plan created them; create the others.

    ``writers`` are the output writers (each has ``name``, ``path`` — the ``.partial``
    volume — and ``create()``), written by every stage of ``stages`` (the plan's
    passes); ``handoffs`` pairs each hand-off array with the stage that writes it (the
    next pass reads it). ``finalized`` names outputs whose finalize unit is done
    (nothing more is written to them). An output whose partial volume is gone while
    ``root/<name>`` exists was moved into place by a finalize that died before its
    marker: it is kept as it is. ``fingerprint``: the recipe's output fingerprint.

    Returns the stages whose done markers were dropped (their units run again).
    """
    run_dir = Path(run_dir)
    plan_fp = plan_fingerprint(plan, fingerprint)
    rec = _record(run_dir)
    created: dict[str, bool] = dict(rec.get("created") or {}) if rec.get("plan") == plan_fp else {}
    finalized = set(finalized)
    drop: set[str] = set()

    def create(volume: Any, writers_of_it: Iterable[str]) -> None:
        created.pop(str(volume.path), None)
        _save(run_dir, plan_fp, created)  # a kill during create() leaves it "not created"
        volume.create()
        created[str(volume.path)] = True
        _save(run_dir, plan_fp, created)
        drop.update(writers_of_it)

    for w in writers:
        if w.name in finalized:
            continue
        from emflow.io import bucket
        from emflow.io.location import is_url

        if is_url(str(w.path)):  # a bucket output (no .partial): its marker object
            if created.get(w.path) and bucket.exists(w.path):
                continue
            create(w, stages)
            continue
        partial = Path(w.path)
        final = (Path(root) if isinstance(root, Path) else partial.parent) / w.name
        if created.get(str(partial)) and (partial.exists() or final.exists()):
            continue
        create(w, stages)
    if not finalized:  # once finalizing began, every pass is done: hand-offs are not read
        for h, stage in handoffs:
            if created.get(str(h.path)) and h.exists():  # a folder, or in the bucket
                continue
            create(h, [stage])
    dropped = [s for s in sorted(drop) if (run_dir / MARKERS / s).is_dir()]
    for stage in dropped:
        shutil.rmtree(run_dir / MARKERS / stage, ignore_errors=True)
    return dropped
