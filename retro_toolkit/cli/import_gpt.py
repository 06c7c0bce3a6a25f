"""`retro-run import-gpt SOURCE --out FILE.nemo [--tokenizer MODEL]`: a GPT from Hugging Face,
NeMo 1.x or Megatron-LM as a .nemo package that pretrain.init_from starts Retro from."""

from __future__ import annotations

import argparse

NAME = "import-gpt"
DESCRIPTION = """\
Convert a GPT into this toolkit's .nemo package. SOURCE is detected:
  a Hugging Face save_pretrained folder (config.json; model.safetensors or shards listed in
    model.safetensors.index.json): logits equal transformers' (float32);
  a NeMo 1.x megatron_gpt .nemo (e.g. GPT-2B-001, Nemotron-3-8B-Base-4k): model_weights.ckpt,
    mp_rank_XX/ shards or a model_weights/ dist checkpoint, legacy or megatron-core names;
  a Megatron-LM GPT checkpoint folder (latest_checkpointed_iteration.txt), legacy or torch_dist,
    any tensor-parallel size (give --tokenizer: these carry none).
Hugging Face architectures read: Llama, Mistral, Qwen2, Nemotron (grouped-query attention,
RoPE base and rotated fraction, RMSNorm or LayerNorm1P, SwiGLU or squared ReLU, q/k/v biases,
tied or untied embeddings, llama3 RoPE scaling); other RoPE scaling kinds and partial biases are
refused, naming the key. The tokenizer comes along: a Hugging Face folder's tokenizer.json
(special tokens from tokenizer_config.json) or tokenizer.model, a NeMo package's SentencePiece
model; --tokenizer replaces it.

Beside FILE.nemo it writes FILE.model.yaml, the recipe's model section for a Retro model around
this decoder (Retro's own keys at their defaults). Start Retro from it:
  retro-run import-gpt Llama-2-7b-hf/ --out llama2.nemo
  retro-run RECIPE model=llama2.model.yaml pretrain.init_from=llama2.nemo \
      tokenizer.model=Llama-2-7b-hf/
(pretrain.init_from also reads SOURCE directly; it names every model key that differs.)
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="a GPT (Hugging Face, NeMo 1.x, Megatron-LM) as a .nemo package",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a Hugging Face folder, a NeMo 1.x .nemo or a Megatron-LM checkpoint folder")
    p.add_argument("--out", required=True, help="the .nemo file to write")
    p.add_argument("--tokenizer", help="the model's tokenizer: a SentencePiece .model, a tokenizer.json or its "
                   "folder (default: the one SOURCE carries)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full pickle loading of .pt/.ckpt files (runs code from them); only for files you trust")
    return p


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    from retro_toolkit.checkpoint.gpt_sources import import_gpt

    print(f"wrote {import_gpt(args.source, args.out, tokenizer=args.tokenizer, trust=args.trust_checkpoint)}")
    return 0
