"""How much of the text a chunk's neighbours could supply, against other samples' neighbours.

    python benchmarks/probes/neighbour_signal.py WORKDIR [--samples 300] [--out FILE.json]

For every target position a chunk's neighbours serve ((i+1)m - 1 .. (i+2)m - 2 for chunk i),
counts a "bigram hit" when the next token follows the current token somewhere in the
neighbours (what copying from them could predict), overall and for rarer next tokens
(seen fewer than 20 times in the sampled windows). The same count with the neighbours of
another sample is the chance level. Reads a work directory after build_db.
benchmarks/probes/retro_vs_gpt.py --neighbour-signal records it beside a run's perplexities
(the recorded results: benchmarks/results/retro_vs_gpt/).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import add_out, write_result  # noqa: E402
from retro_toolkit.collections.retro.engine import dataset  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from retro_toolkit.recipe import load_recipe  # noqa: E402

RARE_BELOW = 20


def follow_sets(neighbors: np.ndarray) -> dict[int, set[int]]:
    """token -> the tokens that follow it anywhere in these neighbours [k, r]."""
    out: dict[int, set[int]] = {}
    for row in neighbors:
        for a, b in zip(row[:-1].tolist(), row[1:].tolist()):
            out.setdefault(a, set()).add(b)
    return out


def split_signal(recipe, split: str, samples: int) -> dict[str, float]:
    data = dataset(recipe, split, "retro", None, blend=False, shuffle=False)
    n = min(len(data), samples)
    m = recipe.model.chunk_length
    items = [data[i] for i in range(n)]
    counts = np.bincount(np.concatenate([s["labels"] for s in items]))
    hits = {"own": [0, 0], "other": [0, 0]}  # [all, rare]
    positions = rare = 0
    for i, s in enumerate(items):
        tokens, labels = s["tokens"], s["labels"]
        sources = {"own": s["neighbor_tokens"], "other": items[(i * 7 + 13) % n]["neighbor_tokens"]}
        for c in range(len(tokens) // m - 1):  # the last chunk's targets leave the window
            follows = {name: follow_sets(nb[c]) for name, nb in sources.items()}
            for t in range((c + 1) * m - 1, (c + 2) * m - 1):
                cur, nxt = int(tokens[t]), int(labels[t])
                is_rare = bool(counts[nxt] < RARE_BELOW)
                positions += 1
                rare += is_rare
                for name, f in follows.items():
                    hit = nxt in f.get(cur, ())
                    hits[name][0] += hit
                    hits[name][1] += hit and is_rare
    return {"samples": n, "positions": positions, "rare_positions": rare,
            "bigram_hit": hits["own"][0] / positions, "bigram_hit_other_sample": hits["other"][0] / positions,
            "rare_bigram_hit": hits["own"][1] / max(rare, 1),
            "rare_bigram_hit_other_sample": hits["other"][1] / max(rare, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--samples", type=int, default=300, help="windows per split (in stream order)")
    ap.add_argument("--splits", nargs="+", default=["valid", "train"])
    add_out(ap, __file__)
    a = ap.parse_args()
    recipe = load_recipe(str(a.workdir / "recipe.resolved.yaml"))
    result = {"workdir": str(a.workdir), **{s: split_signal(recipe, s, a.samples) for s in a.splits}}
    write_result(result, a.out)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a work directory without build_db, a missing recipe: say so, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
