"""emflow: align and ingest serial-section EM stacks into multiscale volumes on Dask.

Notebook use::

    import emflow
    recipe = emflow.load_recipe("recipe.yaml")   # or a dict: emflow.recipe_from_dict({...})
    emflow.discover(recipe)                      # the slices (a table in Jupyter)
    emflow.plan(recipe)                          # levels, stages, units, memory
    result = emflow.run(recipe)                  # serial; or emflow.run(recipe, client=client)
    em = emflow.open(result, level=0)            # xarray.DataArray (z, y, x) in nm, lazy

The public functions are listed in docs/api.md.

``import emflow`` stays cheap (about 0.2 s): Dask, distributed and tensorstore load only
when a run or a plan needs them (:mod:`emflow.api` imports them where used).
"""

# bound here, after the submodules of the same names (emflow.discover, emflow.plan) loaded
from emflow.api import Served, discover, open, plan, run, serve
from emflow.errors import AlignmentError, EmflowError, OutputError, RecipeError, SourceError
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
