"""The ownership and finalize steps of a run: claim output folders, tidy up, record what was chosen.

Outputs are written as ``<name>.partial`` folders that :class:`OwnedVolume` makes with
emflow's marker first; the finalize units (``emflow.pipeline.finalize_output``) move
each finished one onto ``<name>``, replacing only an earlier output emflow wrote for
this output_dir.
:func:`tidy_run_folder` removes the run folder's intermediates (features, decoded
slice cache, hand-off levels) once the run is complete, unless ``run.keep`` names
them, and :func:`record_resolved` stores every resolved value (the exact 16-bit
window, plan, alignment frame) in ``run.json`` so a run can be reproduced exactly.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emflow.io import ownership
from emflow.lattice.markers import RUN_JSON, read_marker, write_marker
from emflow.recipe import Recipe

#: run-folder intermediates, by the name ``run.keep`` uses
INTERMEDIATES = {
    "features": "features",
    "slice_cache": "slice-cache",
    "handoff": "handoff",
    "rendered": "rendered",  # emflow.io.rendercache.FOLDER
}


class OwnedVolume:
    """An output writer whose ``create()`` first makes its (empty) ``<name>.partial`` folder
    with emflow's marker (:func:`emflow.io.ownership.claim`): what open-or-create calls."""

    def __init__(self, writer: Any, owner: str) -> None:
        self.writer, self.owner = writer, owner
        self.name, self.path = writer.name, writer.path

    def create(self) -> None:
        from emflow.io import bucket
        from emflow.io.location import is_url

        if is_url(str(self.path)):  # a bucket: the marker object first (emflow.io.bucket)
            bucket.claim(self.path, self.owner, self.name)
        else:
            ownership.claim(Path(self.path), self.owner, self.name)
        self.writer.create()


def tidy_run_folder(
    run_dir: Path, keep: Sequence[str], only: Sequence[str] | None = None
) -> list[str]:
    """Remove the intermediates of a complete run that ``keep`` does not name (of those ``only``
    names, when given); return what went."""
    from emflow.io import runmirror
    from emflow.io.location import Location, is_url

    removed = []
    for key, folder in INTERMEDIATES.items():
        if key in keep or (only is not None and key not in only):
            continue
        where = runmirror.data_path(run_dir, folder)  # in the bucket for a mirrored run folder
        if is_url(where):
            loc = Location.of(where)
            if not loc.list():
                continue
            loc.delete_all()
        else:
            path = Path(where)
            if not path.exists():
                continue
            shutil.rmtree(path, ignore_errors=True)
        removed.append(folder)
    return removed


def record_resolved(run_dir: Path, **resolved: Any) -> None:
    """Merge resolved values into ``run.json`` under ``resolved`` (atomically)."""
    path = Path(run_dir) / RUN_JSON
    info = read_marker(path) or {"result": None}
    info["resolved"] = {**info.get("resolved", {}), **resolved}
    write_marker(path, info)


def resolved_values(recipe: Recipe, plan: Any, window: Any, alignment: Any, catalog: Any) -> dict:
    """Every value a run chose that the recipe left open, JSON-ready."""
    return {
        "recipe": recipe.model_dump(mode="json"),
        "align_enabled": bool(recipe.align.enabled or alignment is not None),
        "window": None if window is None else [float(window[0]), float(window[1])],
        "out_dtype": plan.out_dtype,
        "frame_shape_yx": [int(v) for v in plan.frame_shape_yx],
        "slab_depth": int(plan.slab_depth),
        "unit_budget_bytes": int(plan.unit_budget),
        "unit_budget_source": plan.budget_source,
        "levels": [
            {"shape_zyx": list(lev.shape_zyx), "voxel_size_nm_zyx": list(lev.voxel_size_nm_zyx)}
            for lev in plan.levels
        ],
        "stack": {
            "slices": len(catalog.slices),
            "shape_yx": list(catalog.shape_yx),
            "dtype": catalog.dtype,
        },
    }
