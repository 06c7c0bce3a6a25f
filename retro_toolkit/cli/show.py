"""`retro-run show RECIPE [key=value ...]`: the resolved recipe as YAML."""

from __future__ import annotations

import argparse
import sys

from retro_toolkit.cli.recipe_args import load, recipe_command

NAME = "show"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return recipe_command(sub, NAME, help="print the resolved recipe as YAML")


def run(args: argparse.Namespace) -> int:
    recipe = load(args)
    from retro_toolkit.recipe import to_yaml

    sys.stdout.write(to_yaml(recipe))
    return 0
