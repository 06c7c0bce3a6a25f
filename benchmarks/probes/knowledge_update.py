r"""Update what a trained Retro model knows by updating its database, with no training.

    python benchmarks/probes/knowledge_update.py [RECIPE] [key=value ...] [--facts DIR] [--out FILE.json]

RECIPE defaults to recipes/knowledge_update.yaml. The steps:
  1. the invented-facts corpora, probes and tokenizer are written to --facts (default: the
     folder the recipe's data.sources name), unless they are there already;
  2. `retro-run RECIPE`: Retro and its GPT twin are trained on database v1 (skipped where done);
  3. every probe is asked of both models (retrieval from database v1);
  4. `retro-run RECIPE retrieval.extra_sources=[added] retrieval.remove_sources=[removed]`:
     database v2, no training (its dry run is recorded, and the checkpoints' hashes before and after);
  5. the probes again (retrieval from database v2).
The JSON holds, per model and per database version, the share of probes answered with the v1
value, with the v2 value and with neither, for facts the update changed, left alone and added;
the perplexity of the held-out test documents (people who appear only in the added documents)
from eval/ppl.json before and after; and the seconds each step took.

The recorded result: `python benchmarks/probes/knowledge_update.py --out benchmarks/results/knowledge_update.json`
(docs/database_updates.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import add_out, write_result  # noqa: E402

TWIN = "pretrain_gpt_twin"


def retro_run(args: list[str], capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "retro_toolkit", *args], check=False, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode:
        sys.exit(proc.returncode)
    return proc.stdout or ""


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def ask_all(workdir: Path, probes: list[dict], expect: dict[str, str]) -> dict:
    from retro_toolkit.collections.generate.session import load_session
    from retro_toolkit.collections.knowledge.probes import ask, shares

    out = {}
    for label, stage in (("retro", "pretrain"), ("gpt_twin", TWIN)):
        asked = [{**p, "expect": expect[p["kind"]]} for p in probes]
        t0 = time.time()
        answers = ask(load_session(checkpoint=workdir / "checkpoints" / stage), asked)
        out[label] = {**shares(probes, answers), "seconds": round(time.time() - t0, 1)}
    return out


def ppl(workdir: Path) -> dict:
    return json.loads((workdir / "eval" / "ppl.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="recipes/knowledge_update.yaml", help="(default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="recipe keys, as retro-run takes them")
    p.add_argument("--facts", help="where the facts corpora are (default: the folder of the recipe's first source)")
    add_out(p, __file__)
    a = p.parse_args()

    from retro_toolkit.collections.knowledge import facts
    from retro_toolkit.recipe import load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    facts_dir = Path(a.facts or Path(recipe.data.sources[0].path).parent)
    workdir = Path(recipe.workdir)
    timings: dict = {}
    t0 = time.time()
    counts = None
    if not (facts_dir / "probes.jsonl").exists():
        counts = facts.write_all(facts_dir, chunk_length=recipe.model.chunk_length)
    timings["facts_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    retro_run([a.recipe, *a.overrides])
    timings["train_v1_s"] = round(time.time() - t0, 1)
    from retro_toolkit.collections.knowledge.probes import read_probes

    probes = read_probes(facts_dir / "probes.jsonl")
    result: dict = {"recipe": a.recipe, "overrides": a.overrides, "facts": str(facts_dir), "written": counts}
    t0 = time.time()
    result["before"] = {"probes": ask_all(workdir, probes, {"changed": "v1", "unchanged": "v1", "new": "v2"}),
                        "ppl": ppl(workdir)}
    timings["probes_v1_s"] = round(time.time() - t0, 1)
    checkpoints = {s: tree_hash(workdir / "checkpoints" / s) for s in ("pretrain", TWIN)}
    update = [f"retrieval.extra_sources=[{{path: {facts_dir / 'added.jsonl'}}}]",
              f"retrieval.remove_sources=[{{path: {facts_dir / 'removed.jsonl'}}}]"]
    result["update_dry_run"] = retro_run([a.recipe, *a.overrides, *update, "--dry-run"], capture=True).splitlines()
    t0 = time.time()
    retro_run([a.recipe, *a.overrides, *update])
    timings["update_s"] = round(time.time() - t0, 1)
    result["checkpoints_unchanged"] = {s: tree_hash(workdir / "checkpoints" / s) == h for s, h in checkpoints.items()}
    t0 = time.time()
    result["after"] = {"probes": ask_all(workdir, probes, {"changed": "v2", "unchanged": "v1", "new": "v2"}),
                       "ppl": ppl(workdir)}
    timings["probes_v2_s"] = round(time.time() - t0, 1)
    result["timings"] = timings
    write_result(result, a.out)
    for when in ("before", "after"):
        for model, kinds in result[when]["probes"].items():
            print(f"{when:6} {model:8} " + "  ".join(f"{k}: v1 {v['v1']:.1%} v2 {v['v2']:.1%}"
                                                   for k, v in kinds.items() if isinstance(v, dict)))
        test = result[when]["ppl"]["test"]
        print(f"{when:6} held-out test perplexity: Retro {test['ppl']:.2f}, twin {test['ppl_gpt_twin']:.2f}")


if __name__ == "__main__":
    main()
