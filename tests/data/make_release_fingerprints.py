"""Write release_fingerprints.json: each bundled recipe's stage fingerprints under one release.

A stage reruns when its fingerprint changes, so a release whose fingerprints differ from the
previous one's makes users recompute work directories they already have.
tests/test_workdir_reuse.py compares the installed code against this file.

    PYTHONPATH=<checkout of the release> python tests/data/make_release_fingerprints.py

Run it from the repository root; recipes are loaded with a fixed workdir so the
fingerprints do not depend on where the checkout lives.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from retro_toolkit.recipe import load_recipe
from retro_toolkit.runner.manifest import fingerprint

HERE = Path(__file__).parent
RECIPES = HERE.parent.parent / "recipes"
# What a cluster recipe leaves for its user to set. Validation checks that the data root's
# files exist (`stand_in_data` makes them), and fingerprints hold their paths: so the root is fixed.
DATA = Path("/tmp/retro_toolkit_release_data")
CLUSTER = [f"paths.data={DATA}", "executor.account=acct", "executor.partition=gpu",
           "executor.container_image=retro-toolkit:latest", f"executor.container_mounts=[{DATA}:{DATA}]"]
# Variants that switch on keys a default recipe leaves at their old behaviour.
VARIANTS = {
    "smoke": [[], ["model.flavor=megatron_core", "pretrain.retrieval_lr_mult=0.5"],
              ["data.split_by=passage", "model.cca_zero_init=true", "sft.exit_duration_minutes=30"]],
}


def stand_in_data() -> None:
    """Empty stand-ins for every ${paths.data}/... file or folder a bundled recipe names."""
    pieces = [*RECIPES.glob("*.yaml"), *(RECIPES.parent / "yaml").rglob("*.yaml")]
    for rel in sorted({m for f in pieces for m in re.findall(r"\$\{paths\.data\}/([^\s\"',}\]]+)", f.read_text())}):
        target = DATA / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if "." in target.name:
            target.touch()
        else:
            target.mkdir(exist_ok=True)


def fingerprints(recipe_file: Path, overrides: list[str]) -> dict[str, str]:
    text = recipe_file.read_text()
    cluster = CLUSTER if "account: ???" in text or "paths.data" in text else []
    recipe = load_recipe(recipe_file, [f"workdir=/release/{recipe_file.stem}", *cluster, *overrides])
    memo: dict[str, str] = {}
    return {stage: fingerprint(recipe, stage, memo) for stage in recipe.stages}


def main() -> int:
    stand_in_data()
    out = {}
    for f in sorted(RECIPES.glob("*.yaml")):
        for overrides in VARIANTS.get(f.stem, [[]]):
            out[" ".join([f.name, *overrides])] = fingerprints(f, overrides)
    (HERE / "release_fingerprints.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} recipes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
