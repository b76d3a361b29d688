"""emflow: align and ingest serial-section EM stacks into multiscale volumes on Dask.

Notebook use::

    import emflow
    recipe = emflow.load_recipe("recipe.yaml")   # or a dict: emflow.recipe_from_dict({...})
    emflow.discover(recipe)                      # the slices (a table in Jupyter)
    emflow.plan(recipe)                          # levels, stages, units, memory
    result = emflow.run(recipe)                  # serial; or emflow.run(recipe, client=client)
    em = emflow.open(result, level=0)            # xarray.DataArray (z, y, x) in nm, lazy

The public functions are listed in docs/api.md.

``import emflow`` is cheap: the names above load from :mod:`emflow.api` and
:mod:`emflow.recipe` on first use. Every Dask worker imports this package to run a unit,
so it must not pull in the notebook API (pydantic, the planner, the viewer) by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emflow._lazy import lazy_names
from emflow.errors import AlignmentError, EmflowError, OutputError, RecipeError, SourceError

if TYPE_CHECKING:
    from emflow.api import Served, discover, open, plan, run, serve
    from emflow.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = [
    "AlignmentError",
    "EmflowError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "Served",
    "SourceError",
    "discover",
    "load_recipe",
    "open",
    "plan",
    "recipe_from_dict",
    "run",
    "serve",
]
__version__ = "0.1.0"

lazy_names(
    __name__,
    {
        **dict.fromkeys(("Served", "discover", "open", "plan", "run", "serve"), "emflow.api"),
        **dict.fromkeys(("Recipe", "load_recipe", "recipe_from_dict"), "emflow.recipe"),
    },
)
