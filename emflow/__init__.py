"""emflow: align and ingest serial-section EM stacks into multiscale volumes on Dask.

Notebook use::

    import emflow
    recipe = emflow.load_recipe("recipe.yaml")
    result = emflow.run(recipe)              # serial; or emflow.run(recipe, client=client)

``import emflow`` stays cheap (about 0.2 s): Dask, distributed and tensorstore load only
when a run or a plan needs them (:mod:`emflow.api` imports them where used).
"""

# bound here, after the submodules of the same names (emflow.discover, emflow.plan) loaded
from emflow.api import discover, plan, run
from emflow.errors import AlignmentError, EmflowError, OutputError, RecipeError, SourceError
from emflow.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = [
    "AlignmentError",
    "EmflowError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "SourceError",
    "discover",
    "load_recipe",
    "plan",
    "recipe_from_dict",
    "run",
]
__version__ = "0.1.0"
