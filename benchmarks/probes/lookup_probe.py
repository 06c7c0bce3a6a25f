r"""How many steps does a Retro model need to find its place in a neighbour by content?

    python benchmarks/probes/lookup_probe.py [--model yaml/model/retro_demo.yaml] [key=value ...]
        [--max-shift 0 16] [--steps 1500] [--batch 8] [--lr 1e-3] [--vocab 64] [--out FILE.json]

Random tokens, so only retrieval can predict them. Every chunk's neighbours (all k alike) are
the stream from that chunk's start plus a random 0..S-1 tokens (fresh per chunk and sample),
r tokens long: the next chunk is in them, but at an offset only its content gives away,
as with a retrieved near-copy. S = 0 is the aligned case, learnable by position alone.
Per --max-shift value the model trains from the same initial weights and batches
(Adam, constant lr); the JSON has the loss over the positions that have neighbours per
window of steps, next to log V (the loss without retrieval) and the first step whose
window mean is below half of it. No work directory or data is needed.

The recorded results (a 2-layer, hidden-64 Retro; 16- and 64-token chunks):
    python benchmarks/probes/lookup_probe.py num_layers=2 hidden_size=64 num_attention_heads=4 ffn_hidden_size=128 \
        'cca_layers=[1,2]' encoder_final_norm=true chunk_length=16 --max-shift 16 --steps 1500 --batch 8 --lr 3e-3 \
        --out benchmarks/results/lookup_probe_tiny_chunk16.json
    python benchmarks/probes/lookup_probe.py num_layers=2 hidden_size=64 num_attention_heads=4 ffn_hidden_size=128 \
        'cca_layers=[1,2]' encoder_final_norm=true chunk_length=64 --max-shift 64 --steps 1500 --batch 8 --lr 3e-3 \
        --out benchmarks/results/lookup_probe_tiny_chunk64.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import yaml

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from retro_toolkit.core import malloc  # noqa: E402

# As the training stages run.
malloc.keep_freed_memory()

from benchmarks.common import add_out, write_result  # noqa: E402
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from retro_toolkit.recipe.model import ModelConfig  # noqa: E402

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def neighbours(seq: torch.Tensor, chunks: int, m: int, r: int, k: int, max_shift: int,
               g: torch.Generator) -> torch.Tensor:
    """[b, chunks, k, r]: chunk c's neighbours cut from seq at c*m + a random 0..max_shift-1."""
    b = seq.shape[0]
    rows = []
    for c in range(chunks):
        shift = torch.randint(0, max(max_shift, 1), (b, 1), generator=g)
        rows.append(torch.gather(seq, 1, c * m + shift + torch.arange(r)))
    return torch.stack(rows, 1)[:, :, None, :].expand(-1, -1, k, -1)


def run(section: dict, vocab: int, max_shift: int, steps: int, batch: int, lr: float, window: int) -> list[float]:
    torch.manual_seed(0)
    config, args = config_from_model_section(section, vocab_size=vocab)
    model = build_model(config, args).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, m = section["seq_length"], section["chunk_length"]
    r, k = section["num_retrieved_chunks"] * m, section["num_neighbors"]
    g = torch.Generator().manual_seed(1)
    losses, means, t0 = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        seq = torch.randint(0, vocab, (batch, n + r + max_shift), generator=g)
        nb = neighbours(seq, n // m, m, r, k, max_shift, g)
        # Positions before m - 1 see no neighbours; they can only learn the unigram (log V).
        loss = model(seq[:, :n], nb, labels=seq[:, 1:n + 1])[:, m - 1:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % window == 0:
            means.append(round(sum(losses[-window:]) / window, 4))
            print(f"max_shift {max_shift}: step {step}/{steps} loss {means[-1]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="model keys over the model file (chunk_length=16)")
    ap.add_argument("--model", type=Path, default=REPO / "yaml" / "model" / "retro_demo.yaml")
    ap.add_argument("--max-shift", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--window", type=int, default=100)
    add_out(ap, __file__)
    a = ap.parse_args()
    try:
        section = yaml.safe_load(a.model.read_text())
        for item in a.overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in MODEL_KEYS:
                raise ValueError(f"override {item!r}: expected key=value with a model key, e.g. chunk_length=16")
            section[key] = yaml.safe_load(value)
        bad = [s for s in a.max_shift if not 0 <= s <= section["chunk_length"]]
        if bad:
            raise ValueError(f"--max-shift {bad}: each must be 0..chunk_length ({section['chunk_length']})")
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    initialize(1, seed=0)
    t0 = time.perf_counter()
    try:
        runs = {str(s): run(section, a.vocab, s, a.steps, a.batch, a.lr, a.window) for s in a.max_shift}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    half = 0.5 * math.log(a.vocab)
    write_result({
        "model": str(a.model), "overrides": a.overrides, "vocab": a.vocab, "steps": a.steps, "batch": a.batch,
        "lr": a.lr, "window": a.window, "log_vocab": round(math.log(a.vocab), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_by_max_shift": runs,
        "first_step_below_half_log_vocab": {
            s: next(((i + 1) * a.window for i, v in enumerate(means) if v < half), None) for s, means in runs.items()
        },
    }, a.out)


if __name__ == "__main__":
    main()
