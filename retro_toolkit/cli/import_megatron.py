"""`retro-run import-megatron CHECKPOINT_DIR --tokenizer MODEL --out FILE.nemo`: a Megatron-LM
Retro checkpoint (legacy or torch_dist) as a .nemo package."""

from __future__ import annotations

import argparse

NAME = "import-megatron"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from retro_toolkit.checkpoint.megatron_legacy import IMPORT_DESCRIPTION

    im = sub.add_parser(NAME, help="a Megatron-LM Retro checkpoint (legacy or torch_dist) as a .nemo package",
                        description=IMPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("checkpoint", help="the folder holding latest_checkpointed_iteration.txt")
    im.add_argument("--tokenizer", required=True, help="the model's tokenizer: a SentencePiece .model, a tokenizer.json, or its folder")
    im.add_argument("--out", required=True, help="the .nemo file to write")
    im.add_argument("--trust-checkpoint", action="store_true",
                    help="allow full pickle loading (runs code from the file); only for checkpoints you trust")
    im.add_argument("--retro-args", metavar="ARGS_JSON",
                    help="the Retro workdir's args.json the run read its chunk length from (legacy training args "
                         "do not record it; without this file it is taken as 64, Retro's, and said so)")
    return im


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint

    out = import_checkpoint(args.checkpoint, args.tokenizer, args.out, trust=args.trust_checkpoint,
                            retro_args=args.retro_args)
    print(f"wrote {out}")
    return 0
