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

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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

#: public name -> the module it loads from on first use
_LAZY = {
    **dict.fromkeys(("Served", "discover", "open", "plan", "run", "serve"), "emflow.api"),
    **dict.fromkeys(("Recipe", "load_recipe", "recipe_from_dict"), "emflow.recipe"),
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'emflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    object.__setattr__(sys.modules[__name__], name, value)  # bound once: no second lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``emflow.plan`` and ``emflow.discover`` stay the API functions when the submodules of
    the same names load: the import system's binding of a submodule to its package attribute
    is skipped for them (the modules stay in ``sys.modules`` and ``from emflow.plan import``
    works as before)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
