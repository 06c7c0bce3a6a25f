"""`retro-run show-model MODEL [--vocab-size N]`: a model piece's parameter count, per part,
without allocating its weights."""

from __future__ import annotations

import argparse

NAME = "show-model"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    sm = sub.add_parser(NAME, help="parameter count of a model piece, per part (no weights allocated)")
    sm.add_argument("model", help="a yaml/model/*.yaml file or piece name (retro_843m)")
    sm.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary for pieces that take it from the tokenizer (retro_tiny)")
    return sm


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retro_toolkit.errors import UserError
    from retro_toolkit.recipe import paths

    model = args.model
    path = Path(model)
    if not path.is_file():
        path = paths.builtin_root("yaml") / "model" / f"{model}.yaml"
    if not path.is_file():
        raise UserError(f"show-model: {model} is neither a file nor a piece in yaml/model/ (retro-run ls lists them).")
    import warnings

    with warnings.catch_warnings():  # megatron-core warns about apex and TE it does not need here
        warnings.simplefilter("ignore")
        from retro_toolkit.collections.retro.describe import describe_model

        text = describe_model(str(path), vocab_size=args.vocab_size)
    print(text)
    return 0
