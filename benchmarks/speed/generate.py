r"""Generation speed: KV cache against full recompute, batch 1 and batch 8, on CPU.

    python benchmarks/speed/generate.py [--config reference] [--threads 2] [--out FILE.json]

Model: the reference config of benchmarks/speed/model_step.py (12 layers, hidden 512, vocab
32000, chunk 64, k 2, r 128, CCA at 6/9/12), random weights, retrieval on with fixed
random neighbours per row (the QA-contexts mode), greedy, no end-of-document stop so
every row generates exactly the asked number of tokens. Prompt: 64 random tokens.

Measured in one run:
  full recompute, batch 1, 128 new tokens (what upstream's generation did per token)
  KV cache, batch 1 and batch 8, 128 new tokens
  KV cache vs full recompute at 256 new tokens, batch 1, and whether the tokens agree
  one decode matmul with 8 rows against 1 row, per weight shape (what bounds batching)

The recorded result:
    python benchmarks/speed/generate.py --config reference --threads 2 \
        --out benchmarks/results/generate_reference_2threads.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from retro_toolkit.core import malloc  # noqa: E402

# As the model stages run (before torch allocates); RETRO_TOOLKIT_MALLOC=default to compare.
malloc.keep_freed_memory()

import torch  # noqa: E402

from benchmarks.common import add_out, matmul_limit, model_section, write_result  # noqa: E402
from retro_toolkit.collections.generate import FixedNeighbors, SamplingParams, generate_ids  # noqa: E402
from retro_toolkit.collections.retro.config import config_from_model_section  # noqa: E402
from retro_toolkit.collections.retro.model import build_model  # noqa: E402
from retro_toolkit.collections.retro.parallel import initialize  # noqa: E402


def run(model, batch: int, new_tokens: int, use_cache: bool, prompt_len: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(4, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    k, r = model.config.num_neighbors, model.config.retrieved_length
    neighbours = FixedNeighbors([[torch.randint(4, vocab, (r,), generator=g).tolist() for _ in range(k)]
                                 for _ in range(batch)], k, r, pad_id=0)
    t = time.perf_counter()
    outs = generate_ids(model, prompts, SamplingParams(max_new_tokens=new_tokens), neighbours, use_cache=use_cache)
    dt = time.perf_counter() - t
    generated = sum(len(o.tokens) for o in outs)
    return {"batch": batch, "new_tokens": new_tokens, "kv_cache": use_cache, "seconds": dt,
            "tokens_per_s": generated / dt, "tokens": [o.tokens for o in outs]}


def linear_batch_cost(section: dict, reps: int = 30) -> dict:
    """Time of one decode-step matmul at 8 rows over 1 row, for the model's weight shapes.

    Decoding multiplies 1 (or 8) rows by every weight matrix; this ratio bounds how much
    more tokens/s batch 8 can give: at 3x the time for 8x the tokens, 8/3 = 2.7x.
    """
    h, f, v = section["hidden_size"], section["ffn_hidden_size"], section["vocab_size"]
    out = {}
    for name, (n, k) in {"qkv": (3 * h, h), "fc1": (f, h), "fc2": (h, f), "output": (v, h)}.items():
        w = torch.randn(n, k)
        times = {}
        for rows in (1, 8):
            x = torch.randn(rows, k)
            torch.nn.functional.linear(x, w)
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            times[rows] = (time.perf_counter() - t) / reps
        out[name] = {"shape": [n, k], "rows1_s": times[1], "rows8_s": times[8], "rows8_over_rows1": times[8] / times[1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="reference", choices=["tiny", "reference"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    add_out(ap, __file__)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    initialize(1, seed=1)
    section = model_section(a.config)
    torch.manual_seed(0)
    cfg, args = config_from_model_section({**section, "arch": "retro"})
    model = build_model(cfg, args).eval()
    vocab = section["vocab_size"]

    run(model, 1, 8, True, a.prompt, vocab)  # warm-up
    rows = {
        "full_b1_128": run(model, 1, 128, False, a.prompt, vocab),
        "cache_b1_128": run(model, 1, 128, True, a.prompt, vocab),
        "cache_b8_128": run(model, 8, 128, True, a.prompt, vocab),
        "full_b1_256": run(model, 1, 256, False, a.prompt, vocab),
        "cache_b1_256": run(model, 1, 256, True, a.prompt, vocab),
    }
    result = {
        "config": a.config, "threads": a.threads, "prompt_tokens": a.prompt,
        # The machine's speed during this run (its VM varies by tens of percent between runs).
        "matmul_2048_flops_per_s": matmul_limit(reps=3)[0],
        "runs": {name: {k: v for k, v in row.items() if k != "tokens"} for name, row in rows.items()},
        "cache_over_full_256": rows["full_b1_256"]["seconds"] / rows["cache_b1_256"]["seconds"],
        "cache_over_full_128": rows["full_b1_128"]["seconds"] / rows["cache_b1_128"]["seconds"],
        "batch8_over_batch1_tokens_per_s": rows["cache_b8_128"]["tokens_per_s"] / rows["cache_b1_128"]["tokens_per_s"],
        "cache_tokens_equal_full": rows["cache_b1_256"]["tokens"] == rows["full_b1_256"]["tokens"]
        and rows["cache_b1_128"]["tokens"] == rows["full_b1_128"]["tokens"],
        "linear_8_rows_over_1_row": linear_batch_cost(section),
    }
    for name, row in result["runs"].items():
        print(f"{name}: {row['tokens_per_s']:.1f} tokens/s ({row['seconds']:.1f} s)", flush=True)
    print(f"KV cache / full recompute at 256 new tokens: {result['cache_over_full_256']:.1f}x; "
          f"batch 8 / batch 1 tokens/s: {result['batch8_over_batch1_tokens_per_s']:.1f}x; "
          f"tokens equal: {result['cache_tokens_equal_full']}")
    costs = {k: round(v["rows8_over_rows1"], 2) for k, v in result["linear_8_rows_over_1_row"].items()}
    print(f"one matmul, 8 rows over 1 row: {costs}")
    write_result(result, a.out)


if __name__ == "__main__":
    main()
