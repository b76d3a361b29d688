"""``emflow validate``: print the resolved recipe and what discovery finds."""

from __future__ import annotations

import typer

from emflow.cli.options import RecipeArg


def validate(recipe: RecipeArg) -> None:
    """Check a recipe: print it with every default filled in, and a summary of the stack."""
    from emflow.discover import discover_recipe
    from emflow.recipe import load_recipe

    r = load_recipe(recipe)
    typer.echo("# resolved recipe")
    typer.echo(r.to_yaml())
    typer.echo("# discovered stack")
    typer.echo(discover_recipe(r).summary())


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
