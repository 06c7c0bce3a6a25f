"""Retro-fitting a GPT: train a GPT, then add retrieval to it and train only the new parts.

  1. WORKDIR/gpt:   the smoke recipe as a GPT (`model.arch=gpt`, no cross-attention layers),
                    stages tokenizer, prepare_corpus, pretrain; no database is built.
  2. WORKDIR/retro: the same model as Retro, started from the GPT's checkpoint
                    (`pretrain.init_from`), with the GPT's tokenizer, the decoder frozen
                    (`pretrain.freeze_decoder`) and chunked cross-attention's output projection
                    at zero (`model.cca_zero_init`: it starts out computing the GPT's logits).
  3. Both checkpoints loaded: every GPT tensor is unchanged in Retro; the new ones trained.

    python examples/retrofit_gpt.py --workdir /tmp/retro_fit
    python examples/retrofit_gpt.py --workdir /tmp/retro_fit --gpt-iters 200 --retro-iters 100 --docs 79
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from retro_toolkit.collections.generate.session import load_session
from retro_toolkit.recipe import load_recipe
from retro_toolkit.runner.run import execute


def run(workdir: Path, docs: int, iters: int, extra: list[str]) -> Path:
    recipe = load_recipe("smoke", [
        f"workdir={workdir}", f"data.sources=[{{path: 'builtin:pydoc', max_docs: {docs}}}]", "data.split=[0.8,0.1,0.1]",
        "tokenizer.vocab_size=1000", "model.seq_length=128", f"pretrain.train_iters={iters}",
        "pretrain.micro_batch_size=2", "pretrain.global_batch_size=4", "pretrain.lr_warmup_iters=0",
        "pretrain.save_interval=0", f"pretrain.log_interval={max(1, iters // 4)}", *extra,
    ])
    execute(recipe)
    return Path(recipe.workdir)


def losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics" / "pretrain.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="folder for the two work directories")
    p.add_argument("--docs", type=int, default=20, help="pydoc topics in the corpus (79 in all)")
    p.add_argument("--gpt-iters", type=int, default=8, help="GPT pretraining steps")
    p.add_argument("--retro-iters", type=int, default=4, help="retro-fitting steps")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    root = a.workdir.resolve()

    gpt = run(root / "gpt", a.docs, a.gpt_iters,
              ["model.arch=gpt", "model.cca_layers=[]", "stages=[tokenizer,prepare_corpus,pretrain]"])
    retro = run(root / "retro", a.docs, a.retro_iters, [
        f"tokenizer.model={gpt / 'tokenizer'}",  # the GPT's token ids, not a new tokenizer
        f"pretrain.init_from={gpt / 'checkpoints' / 'pretrain'}",
        "pretrain.freeze_decoder=true", "model.cca_zero_init=true",
        "stages=[tokenizer,prepare_corpus,build_db,pretrain]",
    ])
    print(f"GPT loss {losses(gpt)[0]:.3f} -> {losses(gpt)[-1]:.3f}; "
          f"Retro, from it: {losses(retro)[0]:.3f} -> {losses(retro)[-1]:.3f}")

    gpt_state = load_session(workdir=gpt).model.state_dict()
    retro_state = load_session(workdir=retro).model.state_dict()
    shared = [k for k, t in gpt_state.items() if isinstance(t, torch.Tensor)]
    same = sum(torch.equal(gpt_state[k], retro_state[k]) for k in shared)
    new = [k for k, t in retro_state.items() if isinstance(t, torch.Tensor) and k not in gpt_state]
    print(f"decoder: {same}/{len(shared)} GPT tensors unchanged in Retro; {len(new)} new tensors, e.g. {new[0]}")
    proj = [retro_state[k].abs().sum().item() for k in new if k.endswith("cross_attention.attention.linear_proj.weight")]
    print(f"chunked cross-attention output projection, |w| summed: {sum(proj):.4f} (started at 0)")


if __name__ == "__main__":
    main()
