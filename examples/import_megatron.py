"""Import a Megatron-LM Retro checkpoint into a .nemo package, restore it and generate.

Reads both layouts `retro-run import-megatron` reads: legacy Megatron-LM (NVIDIA's released
Retro / InstructRetro models: latest_checkpointed_iteration.txt, release/mp_rank_0X/
model_optim_rng.pt) and megatron-core <= 0.15 torch_dist (iter_NNNNNNN/ with metadata.json).
The model's shape comes from the checkpoint's args; the tokenizer is the model's
SentencePiece file. Legacy args do not record Retro's chunk length: pass the Retro
workdir's args.json as --retro-args (without it 64 is taken, and the import says so).

    python examples/import_megatron.py retro-8b-instruct-4k/ --tokenizer retro-8b-instruct-4k/tokenizer.model \\
        --workdir /tmp/retro8b --chat --prompt "Who wrote Hamlet?"
    # the same on the command line:
    retro-run import-megatron retro-8b-instruct-4k/ --tokenizer tokenizer.model --out /tmp/retro8b/model.nemo
    retro-run generate --nemo /tmp/retro8b/model.nemo --chat --prompt "Who wrote Hamlet?"

Checkpoints to try it on: tests/fidelity/data/legacy_nine_layers_checkpoint (with a
96-piece tokenizer and an args.json holding {"retro_gpt_chunk_length": 4}) and
tests/fidelity/data/nine_layers_torch_dist, both written by the upstream code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
from retro_toolkit.checkpoint.nemo import read_config
from retro_toolkit.collections.generate import SamplingParams
from retro_toolkit.collections.generate.session import load_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="the folder holding latest_checkpointed_iteration.txt")
    p.add_argument("--tokenizer", type=Path, required=True, help="the model's SentencePiece .model file")
    p.add_argument("--workdir", type=Path, required=True, help="where the package is written (WORKDIR/model.nemo)")
    p.add_argument("--retro-args", type=Path, help="legacy checkpoints: the Retro workdir's args.json")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load with full pickle (runs code from the file); only for checkpoints you trust")
    p.add_argument("--prompt", default="the quick brown fox")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as an InstructRetro user turn")
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    package = import_checkpoint(a.checkpoint, a.tokenizer, a.workdir / "model.nemo",
                                trust=a.trust_checkpoint, retro_args=a.retro_args)
    print(f"wrote {package}")

    c = read_config(package)  # model_config.yaml alone, without loading the weights
    print(f"{c['arch']} ({c['flavor']}): {c['num_layers']} layers, hidden {c['hidden_size']}, "
          f"chunk {c['chunk_length']}, {c['num_neighbors']} neighbours, vocab {c['vocab_size']}")
    session = load_session(nemo=package)  # restore()s the package: model (on the GPU if there is one) + tokenizer
    model, tokenizer = session.model, session.tokenizer

    # One forward pass over whole chunks: the prompt padded at the end (causal attention keeps the
    # padding out of the prompt's logits), no neighbours (-1 = missing, masked).
    m = model.config.chunk_length
    ids = tokenizer.encode([a.prompt])[0]
    padded = ids + [tokenizer.pad_id] * (-len(ids) % m)
    device = next(model.parameters()).device
    neighbours = torch.full((1, len(padded) // m, model.config.num_neighbors, model.config.retrieved_length), -1,
                            device=device)
    with torch.no_grad():
        logits = model(torch.tensor([padded], device=device), neighbours)[0, len(ids) - 1]
    print(f"next-token logits: {logits.shape[0]} values, max {logits.max().item():.4f}, "
          f"top token {tokenizer.decode([int(logits.argmax())])!r}")

    # No database here: the chunks get no neighbours. With a work directory built with this tokenizer,
    # load_session(nemo=..., workdir=...) and live_retrieval=True retrieve (generate_live_retrieval.py).
    out = session.generate([a.prompt], SamplingParams(max_new_tokens=a.max_new_tokens), chat=a.chat)[0]
    print(f"generated ({out.finish_reason}, {len(out.tokens)} tokens): {out.text!r}")


if __name__ == "__main__":
    main()
