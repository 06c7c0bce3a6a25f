"""The RECIPE [key=value ...] arguments that run, validate and show share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def recipe_command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand taking RECIPE [key=value ...]; `kwargs` go to add_parser (help, epilog...)."""
    parser = sub.add_parser(name, **kwargs)
    parser.add_argument("recipe", help="recipe file (recipes/smoke.yaml) or bundled recipe name (smoke)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides or group swaps")
    return parser


def load(args: argparse.Namespace) -> DictConfig:
    """The checked recipe the arguments name (UserError on bad input)."""
    from retro_toolkit.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)
