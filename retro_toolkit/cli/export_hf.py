"""`retro-run export-hf PACKAGE --out DIR`: the decoder of a .nemo package as a transformers model."""

from __future__ import annotations

import argparse

NAME = "export-hf"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from retro_toolkit.checkpoint.hf_export import __doc__ as description

    p = sub.add_parser(NAME, help="the decoder of a .nemo package as a transformers model (Llama, Qwen2, GPT-NeoX)",
                       description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", help="the .nemo package (Retro or GPT)")
    p.add_argument("--out", required=True, help="a new folder for config.json, model.safetensors, tokenizer.model")
    return p


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import quiet_warnings

    quiet_warnings()
    from retro_toolkit.checkpoint.hf_export import export_hf

    export_hf(args.package, args.out)
    return 0
