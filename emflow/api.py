"""The functions a notebook calls (re-exported from :mod:`emflow`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import emflow.plan  # noqa: F401  (the module loads first: `emflow.plan` then names the function)
from emflow.discover import SliceCatalog, discover_recipe
from emflow.recipe import Recipe, load_recipe, recipe_from_dict

if TYPE_CHECKING:  # imported where used: Dask and tensorstore load only when a run starts
    from emflow.pipeline import RunResult
    from emflow.plan import Plan


def _as_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def run(
    recipe: Recipe | str | Path | dict,
    *,
    client: Any = None,
    restart: bool = False,
    progress: bool | None = None,
    log: Any = None,
    alignment: str | Path | None = None,
) -> RunResult:
    """Run an ingest. ``client=None`` runs serially in this process; pass a Dask Client to distribute.

    ``alignment`` names a saved alignment.json to re-export with (no feature matching).
    """
    from emflow.pipeline import run as _run

    return _run(
        _as_recipe(recipe),
        client=client,
        restart=restart,
        progress=progress,
        log=log,
        alignment_path=alignment,
    )


def discover(recipe: Recipe | str | Path | dict) -> SliceCatalog:
    """Discover the source slices of a recipe (headers only)."""
    return discover_recipe(_as_recipe(recipe))


def plan(recipe: Recipe | str | Path | dict, *, alignment: str | Path | None = None) -> Plan:
    """The plan ``run`` would execute: levels, stages, units and their planned memory.

    It depends on the recipe and the stack only (and on the frame of a saved ``alignment``;
    without one an aligned run plans again after its solve). See ``Plan.summary()``.
    """
    from emflow.plan import plan_preview

    r = _as_recipe(recipe)
    cat = discover_recipe(r)
    p, _note = plan_preview(
        r, len(cat.slices), cat.shape_yx, cat.dtype, alignment_path=alignment, refs=cat.slices
    )
    return p
