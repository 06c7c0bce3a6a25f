"""`retro-run validate RECIPE [key=value ...]`: check a recipe and its input files, without
torch, so a login node or laptop can do it."""

from __future__ import annotations

import argparse

from retro_toolkit.cli.recipe_args import load, recipe_command

NAME = "validate"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return recipe_command(sub, NAME, help="check a recipe and its input files; exit 0 or 2")


def run(args: argparse.Namespace) -> int:
    recipe = load(args)
    from retro_toolkit.runner.plan import check_stages
    from retro_toolkit.runner.preflight import check_inputs, check_launch

    check_stages(recipe)
    check_inputs(recipe)
    check_launch(recipe)
    print(f"{args.recipe}: ok ({', '.join(recipe.stages)}; executor {recipe.executor.type})")
    return 0
