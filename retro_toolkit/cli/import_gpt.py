"""`retro-run import-gpt FOLDER --out FILE.nemo [--tokenizer MODEL]`: a Hugging Face GPT
(Llama, Mistral, Qwen2, Nemotron) as a .nemo package that pretrain.init_from starts Retro from."""

from __future__ import annotations

import argparse

NAME = "import-gpt"
DESCRIPTION = """\
Convert a Hugging Face GPT save_pretrained folder (config.json, model.safetensors or
sharded safetensors with model.safetensors.index.json) into a .nemo package: a GPT whose
logits equal transformers' (float32). Llama, Mistral, Qwen2 and Nemotron are read:
grouped-query attention, the RoPE base and rotated fraction, RMSNorm or LayerNorm1P, SwiGLU or
squared ReLU, query/key/value biases (Qwen2), tied or untied embeddings. RoPE scaling and partial biases are refused, naming the config key.

Start Retro from it with the package's tokenizer and its model settings:
  retro-run import-gpt Llama-2-7b-hf/ --out llama2.nemo
  retro-run RECIPE pretrain.init_from=llama2.nemo tokenizer.model=Llama-2-7b-hf/tokenizer.model ...
(`retro-run show-model`, and pretrain's refusal naming each differing key, tell which model keys to set.)
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="a Hugging Face GPT (Llama, Mistral, Qwen2, Nemotron) as a .nemo package",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the save_pretrained folder holding config.json")
    p.add_argument("--out", required=True, help="the .nemo file to write")
    p.add_argument("--tokenizer", help="the model's SentencePiece .model (default: FOLDER/tokenizer.model)")
    return p


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import quiet_warnings

    quiet_warnings()
    from retro_toolkit.checkpoint.hf_gpt import import_hf_gpt

    print(f"wrote {import_hf_gpt(args.folder, args.out, tokenizer=args.tokenizer)}")
    return 0
