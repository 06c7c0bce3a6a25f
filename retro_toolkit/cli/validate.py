"""`retro-run validate RECIPE [key=value ...] [--estimate]`: check a recipe and its input files,
without torch, so a login node or laptop can do it; --estimate also prints the disk each stage
writes and the memory per rank of build_db and pretrain (runner/estimate.py; imports torch to
count the model's parameters on the meta device)."""

from __future__ import annotations

import argparse

from retro_toolkit.cli.recipe_args import load, recipe_command

NAME = "validate"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = recipe_command(sub, NAME, help="check a recipe and its input files; exit 0 or 2")
    p.add_argument("--estimate", action="store_true",
                   help="also print estimated disk per stage and memory per rank (build_db, pretrain, sft), from "
                        "the corpus sizes and the model's parameter count, to size an allocation before queueing")
    return p


def run(args: argparse.Namespace) -> int:
    recipe = load(args)
    from retro_toolkit.runner.plan import check_stages
    from retro_toolkit.runner.preflight import check_inputs, check_launch

    check_stages(recipe)
    check_inputs(recipe)
    check_launch(recipe)
    print(f"{args.recipe}: ok ({', '.join(recipe.stages)}; executor {recipe.executor.type})")
    if args.estimate:
        from retro_toolkit.core.cpu import before_megatron

        before_megatron()
        from retro_toolkit.runner.estimate import report

        print(report(recipe))
    return 0
