"""`retro-run ls`: the bundled recipes and yaml pieces, each with its one-line description."""

from __future__ import annotations

import argparse

NAME = "ls"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="list bundled recipes and yaml pieces")


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.recipe import paths

    recipes = paths.builtin_root("recipes")
    print(f"recipes ({recipes}):")
    for f in sorted(recipes.glob("*.yaml")):
        print(f"  {f.stem:<28} {paths.describe(f)}")
    root = paths.builtin_root("yaml")
    print(f"\nyaml pieces ({root}), used as group=name:")
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        print(f"  {group.name}:")
        for f in sorted(group.glob("*.yaml")):
            print(f"    {f.stem:<26} {paths.describe(f)}")
    return 0
