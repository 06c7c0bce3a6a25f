"""`retro-run export-safetensors PACKAGE --out DIR`: a .nemo package as safetensors,
config.json and tokenizer, for other inference engines."""

from __future__ import annotations

import argparse

NAME = "export-safetensors"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    es = sub.add_parser(NAME, help="a .nemo package as safetensors + config.json + tokenizer",
                        description="Writes OUT/model.safetensors (unsharded tensors, retro_toolkit's parameter "
                        "names), OUT/config.json (model settings, tokenizer, retrieval settings, every tensor's "
                        "shape) and the tokenizer's files, for other inference engines. Load it back with "
                        "retro_toolkit.checkpoint.safetensors_io.load_safetensors.")
    es.add_argument("package", help="a .nemo file")
    es.add_argument("--out", required=True, help="output folder (replaced atomically)")
    return es


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    from retro_toolkit.checkpoint.safetensors_io import export_safetensors

    print(f"wrote {export_safetensors(args.package, args.out)}")
    return 0
