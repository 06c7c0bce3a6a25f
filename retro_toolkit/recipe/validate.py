"""Check a composed recipe and say exactly what is wrong.

The types say most of it (recipe/checker.py walks the schema); each stage adds the checks
types cannot express (its `check`), and the executor settings are checked against the
executor type the recipe picks.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retro_toolkit.errors import UserError
from retro_toolkit.executors import EXECUTOR_SCHEMAS, MODEL_PARALLEL_STAGES, NOT_PER_STAGE, for_stage, processes
from retro_toolkit.recipe import model
from retro_toolkit.recipe.checker import Checker, choice_error
from retro_toolkit.recipe.schema import Recipe
from retro_toolkit.stages import STAGE_NAMES, STAGES


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    defaults = OmegaConf.create(dataclasses.asdict(Recipe()))
    try:
        return OmegaConf.to_container(OmegaConf.merge(defaults, cfg), resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot resolve recipe key '{key}': {msg}.") from None


def _unset_keys(value: Any, key: str = "") -> list[str]:
    """Every key still holding OmegaConf's '???' (required, not set), in document order."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _unset_keys(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _unset_keys(v, f"{key}[{i}]")]
    return [key] if value == "???" else []


def _check_stages(r: dict[str, Any]) -> None:
    """The stage list, the model, then each stage's own checks (gated ones only when run)."""
    if len(set(r["stages"])) != len(r["stages"]):
        twice = next(s for i, s in enumerate(r["stages"]) if s in r["stages"][:i])
        raise UserError(f"stage '{twice}' is listed twice in 'stages'.")
    if not r["stages"]:
        raise UserError("recipe key 'stages' is empty: list the stages to run, e.g. [tokenizer, prepare_corpus].")
    model.check(r["model"])
    for spec in STAGES.values():
        if spec.check is not None and (not spec.gated or spec.name in r["stages"]):
            spec.check(r)


def _check_executor(raw: Any, checker: Checker) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"recipe key 'executor' must be a mapping with a 'type' ({', '.join(EXECUTOR_SCHEMAS)}).")
    etype = raw.get("type", "local")
    if etype not in EXECUTOR_SCHEMAS:
        raise choice_error("executor.type", str(etype), tuple(EXECUTOR_SCHEMAS))
    own = {f.name for f in dataclasses.fields(EXECUTOR_SCHEMAS[etype])}
    for key in raw:
        owners = [t for t, cls in EXECUTOR_SCHEMAS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if key not in own and owners:
            raise UserError(
                f"recipe key 'executor.{key}' does not apply to the {etype} executor; it belongs to "
                f"{' and '.join(owners)}. Select one with executor={owners[0]}."
            )
    out = checker.check_dataclass(raw, EXECUTOR_SCHEMAS[etype], "executor")
    out["stages"] = _check_stage_overrides(out["stages"], etype, checker)
    return out


def _check_stage_overrides(stages: dict[str, Any], etype: str, checker: Checker) -> dict[str, Any]:
    cls = EXECUTOR_SCHEMAS[etype]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settable = [name for name in fields if name not in NOT_PER_STAGE]
    out = {}
    for stage, override in stages.items():
        where = f"executor.stages.{stage}"
        if stage not in STAGE_NAMES:
            hint = difflib.get_close_matches(stage, STAGE_NAMES, n=1)
            raise UserError(f"recipe key '{where}' names no stage." + (f" Did you mean '{hint[0]}'?" if hint else "")
                            + f" Stages: {', '.join(STAGE_NAMES)}.")
        if override is None:
            override = {}
        if not isinstance(override, dict):
            raise UserError(f"recipe key '{where}' must be a mapping of {etype} executor keys, e.g. "
                            f"{{{settable[0]}: ...}}; got {override!r}.")
        for key in override:
            if key not in settable:
                near = [k for k in settable if k.startswith(str(key))][:1] or difflib.get_close_matches(
                    str(key), settable, n=1)
                why = " (one setting for every stage)" if key in NOT_PER_STAGE else ""
                raise UserError(f"recipe key '{where}.{key}' cannot be set per stage{why}."
                                + (f" Did you mean '{where}.{near[0]}'?" if near else "")
                                + f" Keys a stage can set: {', '.join(settable)}.")
        out[stage] = {k: checker.check(v, hints[k], f"{where}.{k}", fields[k]) for k, v in override.items()}
    return out


def _check_parallel(r: dict[str, Any]) -> None:
    """Each model stage's process count fits the TP size and the batch (before any job is queued)."""
    tp = r["model"]["tensor_model_parallel_size"]
    executor = OmegaConf.create(r["executor"])
    for stage in MODEL_PARALLEL_STAGES:
        if stage not in r["stages"]:
            continue
        n = processes(for_stage(executor, stage))
        if n % tp:
            raise UserError(
                f"stage '{stage}' starts {n} process(es) (executor settings, with executor.stages.{stage}), "
                f"which model.tensor_model_parallel_size = {tp} does not divide. Give it a multiple of {tp}."
            )
        if stage in ("pretrain", "sft"):
            s, dp = r[stage], n // tp
            if s["global_batch_size"] % (s["micro_batch_size"] * dp):
                raise UserError(
                    f"{stage}.global_batch_size ({s['global_batch_size']}) must be a multiple of "
                    f"{stage}.micro_batch_size ({s['micro_batch_size']}) x data-parallel ranks ({dp} = {n} "
                    f"processes / tensor parallel {tp}) = {s['micro_batch_size'] * dp}."
                )


def validate(cfg: DictConfig, recipe_file: Path | None = None) -> DictConfig:
    """Return the checked, resolved recipe (read-only); raise UserError on the first problem."""
    # Before merging onto the schema's defaults: OmegaConf keeps a default over a merged '???'.
    unset = _unset_keys(OmegaConf.to_container(cfg, resolve=False))
    if len(unset) == 1:
        raise UserError(f"recipe key '{unset[0]}' is required but not set. Set it in the recipe or as {unset[0]}=...")
    if unset:
        raise UserError(f"recipe keys required but not set: {', '.join(unset)}. Set them in the recipe "
                        "or as key=value overrides.")
    resolved = _resolve(cfg)
    runs = set(resolved["stages"]) if isinstance(resolved.get("stages"), list) else set()
    placeholders = frozenset(s.section for s in STAGES.values() if s.gated and s.name not in runs)
    checker = Checker(Recipe)
    checked = checker.check_dataclass(resolved, Recipe, "", unranged=placeholders)
    checked["executor"] = _check_executor(checked["executor"], checker)
    _check_stages(checked)
    _check_parallel(checked)
    out = OmegaConf.create(checked)
    OmegaConf.set_readonly(out, True)
    return out
