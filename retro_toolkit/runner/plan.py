"""Which stages a run executes: the recipe's stages in dependency order, each run or skipped."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from retro_toolkit.errors import UserError
from retro_toolkit.runner import manifest
from retro_toolkit.stages import STAGES


@dataclass
class Step:
    stage: str
    run: bool
    reason: str


def _check_names(names: list[str], recipe: DictConfig, flag: str) -> None:
    for n in names:
        if n not in STAGES:
            hint = difflib.get_close_matches(n, list(STAGES), n=1)
            raise UserError(
                f"unknown stage '{n}' in {flag}."
                + (f" Did you mean '{hint[0]}'?" if hint else "")
                + f" Stages: {', '.join(STAGES)}."
            )
        if n not in recipe.stages:
            raise UserError(
                f"stage '{n}' in {flag} is not one of this recipe's stages ({', '.join(recipe.stages)}); "
                f"add it to 'stages' in the recipe or with stages=[...]."
            )


def check_stages(recipe: DictConfig) -> None:
    """Every listed stage exists in this version and has its dependencies listed too."""
    arch = OmegaConf.select(recipe, "model.arch", default="retro")
    for s in recipe.stages:
        spec = STAGES[s]
        for d in spec.needs(arch):
            if d not in recipe.stages:
                why = " (a Retro model retrieves from its database; model.arch=gpt trains without one)" \
                    if d == "build_db" and spec.gpt_depends_on else ""
                raise UserError(f"stage '{s}' needs stage '{d}'{why}: add '{d}' to 'stages'.")


def make_plan(recipe: DictConfig, only: list[str] | None = None, force: list[str] | None = None) -> list[Step]:
    check_stages(recipe)
    force = force or []
    _check_names(force, recipe, "--force")
    ordered = [s for s in STAGES if s in recipe.stages]
    if only:
        _check_names(only, recipe, "--stages")
        wanted = set(only)
        for s in reversed(ordered):  # pull in unfinished ancestors of what was asked for
            if s in wanted:
                for d in STAGES[s].upstream(recipe.stages):
                    if not manifest.status(recipe, d)[0] or d in force:
                        wanted.add(d)
        wanted |= set(force) & set(ordered)
    else:
        wanted = set(ordered)

    steps: list[Step] = []
    for s in ordered:
        if s not in wanted:
            continue
        current, why = manifest.status(recipe, s)
        rerun_deps = [st.stage for st in steps if st.run and st.stage in STAGES[s].upstream(recipe.stages)]
        if not current and rerun_deps and why.startswith("an upstream"):
            why = f"upstream '{rerun_deps[0]}' changed"
        steps.append(Step(s, s in force or not current, "forced" if s in force else why))
    return steps
