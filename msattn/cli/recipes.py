"""``msattn recipes``: the recipes shipped with msattn (list, show, copy); the logic is :mod:`msattn.config.bundled`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msattn.cli.common import PlainHelpCommand, PlainHelpGroup

recipes_app = typer.Typer(
    help="List, show or copy the recipes shipped with msattn.\n\nWithout a command: one line per recipe. "
    "msattn train NAME trains one.",
    invoke_without_command=True, rich_markup_mode=None, cls=PlainHelpGroup,
)  # fmt: skip

RecipeName = Annotated[str, typer.Argument(help="A bundled recipe's name, e.g. demo (msattn recipes lists them).",
                                           show_default=False)]  # fmt: skip


@recipes_app.callback()
def recipes(ctx: typer.Context) -> None:
    """List the bundled recipes, one line each; msattn train NAME trains one."""
    if ctx.invoked_subcommand is not None:
        return
    from msattn.config.bundled import bundled_recipes, recipes_dir  # here, not at the top: see msattn.cli.app

    found = bundled_recipes()
    width = max(len(r.name) for r in found) + 2
    for recipe in found:
        typer.echo(f"{recipe.name:<{width}}{recipe.summary}")
    typer.echo(f"\n{len(found)} recipes in {recipes_dir()}", err=True)
    typer.echo("train one: msattn train NAME; read it: msattn recipes show NAME\n"
               "start your own from it: msattn recipes copy NAME my.toml", err=True)  # fmt: skip


def show(name: RecipeName) -> None:
    """Print a bundled recipe.

    The text as shipped: msattn recipes show demo > my.toml is a recipe.
    """
    from msattn.config.bundled import get_bundled

    typer.echo(get_bundled(name).path.read_text(encoding="utf-8-sig"), nl=False)


def copy(
    name: RecipeName,
    dest: Annotated[Path, typer.Argument(help="File to write, or a folder for NAME.toml; never over an existing "
                                        "file.")] = Path("."),  # fmt: skip
) -> None:
    """Copy a bundled recipe to start your own."""
    from msattn.config.bundled import copy_recipe

    target = copy_recipe(name, dest)
    typer.echo(f"wrote {target} (the bundled {name.removesuffix('.toml')}); edit it, then: msattn train {target}")


recipes_app.command(cls=PlainHelpCommand)(show)
recipes_app.command(cls=PlainHelpCommand)(copy)
