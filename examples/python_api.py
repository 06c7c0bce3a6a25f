"""The whole pipeline from Python: recipe -> every stage -> perplexity -> .nemo -> logits and text.

Loads the bundled smoke recipe with overrides that shrink it (a few pydoc topics, a
1000-piece tokenizer, 128-token sequences, a few training steps), runs its stages as
`retro-run` does (tokenizer, prepare_corpus, build_db, pretrain, eval_ppl, sft, eval_qa,
export), reads eval/ppl.json, restores the exported .nemo package, scores a text with
retrieved neighbours and generates a few tokens with live retrieval.

    python examples/python_api.py --workdir /tmp/retro_api            # about a minute on 2 CPU cores
    python examples/python_api.py --workdir /tmp/retro_api --docs 79 --iters 200   # the full smoke run

A rerun with the same options skips every finished stage. The work directory it leaves
is what examples/generate_live_retrieval.py takes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from pydoc_data.topics import topics

import torch

from retro_toolkit.checkpoint.nemo import Package, restore
from retro_toolkit.collections.generate import LiveRetrieval, SamplingParams, generate_text
from retro_toolkit.collections.retrieval.retriever import Retriever
from retro_toolkit.recipe import load_recipe
from retro_toolkit.runner.run import execute


def tiny_overrides(workdir: Path, docs: int, iters: int) -> list[str]:
    """`key=value` overrides, exactly as on the retro-run command line."""
    return [
        f"workdir={workdir}",
        f"data.sources=[{{path: 'builtin:pydoc', max_docs: {docs}}}]",
        "data.split=[0.8,0.1,0.1]",
        "tokenizer.vocab_size=1000",
        "retrieval.block_size=100",
        "model.seq_length=128",
        f"pretrain.train_iters={iters}", "pretrain.micro_batch_size=2", "pretrain.global_batch_size=4",
        "pretrain.lr_warmup_iters=0", "pretrain.save_interval=0", f"pretrain.log_interval={max(1, iters // 4)}",
        "eval_ppl.max_samples=4",
        f"sft.train_iters={max(1, iters // 2)}", "sft.micro_batch_size=2", "sft.global_batch_size=4",
        "eval_qa.tasks=[{name: smoke, path: 'builtin:smoke-qa', max_samples: 4}]", "eval_qa.max_new_tokens=4",
    ]


@torch.no_grad()
def score_text(pkg: Package, retriever: Retriever, text: str) -> float:
    """Perplexity of `text` under the package's model, each chunk's neighbours retrieved from the database."""
    m = pkg.model.config.chunk_length
    ids = pkg.tokenizer.encode([text])[0]
    ids = ids[: len(ids) // m * m]  # the model takes whole chunks
    if not ids:
        raise SystemExit(f"the text has fewer than {m} tokens: use a longer one.")
    chunks = [ids[i : i + m] for i in range(0, len(ids), m)]
    neighbours = torch.from_numpy(retriever.search(chunks).tokens).long()  # [chunks, k, r]
    device = next(pkg.model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    logits = pkg.model(tokens, neighbours[None].to(device))  # [1, n, vocab]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
    return math.exp(loss.item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="work directory (created; reused if it exists)")
    p.add_argument("--docs", type=int, default=20, help="pydoc topics in the corpus (79 in all)")
    p.add_argument("--iters", type=int, default=4, help="pretraining steps (sft takes half as many)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate")
    a = p.parse_args()

    recipe = load_recipe("smoke", tiny_overrides(a.workdir.resolve(), a.docs, a.iters))
    execute(recipe)  # raises (StageFailed, UserError) naming the failed stage and its log

    workdir = Path(recipe.workdir)
    for split, r in json.loads((workdir / "eval" / "ppl.json").read_text()).items():
        print(f"eval_ppl {split}: ppl {r['ppl']:.2f}, without retrieval {r['ppl_no_retrieval']:.2f}")

    pkg = restore(workdir / "export" / f"{recipe.export.name or recipe.name}.nemo")  # on the GPU if there is one
    retriever = Retriever(workdir)
    print(f"text ppl: {score_text(pkg, retriever, topics['with']):.2f}")

    live = LiveRetrieval(retriever, k=pkg.model.config.num_neighbors)
    out = generate_text(pkg.model, pkg.tokenizer, ["The with statement"], SamplingParams(max_new_tokens=a.max_new_tokens),
                        live)[0]
    print(f"generated ({out.finish_reason}, {len(out.tokens)} tokens): {out.text!r}")


if __name__ == "__main__":
    main()
