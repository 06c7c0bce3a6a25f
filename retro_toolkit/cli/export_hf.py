"""`retro-run export-hf PACKAGE --out DIR`: the decoder of a .nemo package as a transformers model."""

from __future__ import annotations

import argparse

from retro_toolkit.checkpoint import hf_export  # its docstring is the help; it imports transformers only when run

NAME = "export-hf"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, description=hf_export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="the decoder of a .nemo package as a transformers model (Llama, Qwen2, GPT-NeoX)")
    p.add_argument("package", help="the .nemo package (Retro or GPT)")
    p.add_argument("--out", required=True, help="a new folder for config.json, model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json)")
    return p


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    hf_export.export_hf(args.package, args.out)
    return 0
