"""Stage manifests: `<workdir>/stages/<stage>.json`, written last by a finished stage.

A stage is current when its manifest exists, its fingerprint (hash of the stage's
recipe keys, its code version and its upstream fingerprints) equals the one the recipe
gives now, and the outputs it lists are still on disk. Like make, a changed key reruns
the stage and, through the fingerprint chain, everything downstream.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retro_toolkit.core import files
from retro_toolkit.stages import STAGES


def path(workdir: str | os.PathLike, stage: str) -> Path:
    return Path(workdir) / "stages" / f"{stage}.json"


def read(workdir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    p = path(workdir, stage)
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # missing or unreadable: the stage counts as not done
    return data if isinstance(data, dict) else None


def stage_config(recipe: DictConfig, stage: str) -> dict[str, Any]:
    cfg = {}
    for key in STAGES[stage].config_keys:
        node = OmegaConf.select(recipe, key)
        cfg[key] = OmegaConf.to_container(node) if isinstance(node, (DictConfig,)) or OmegaConf.is_list(node) else node
    for key, default in STAGES[stage].added_keys:
        section, _, leaf = key.rpartition(".")
        if isinstance(cfg.get(section), dict) and cfg[section].get(leaf) == default:
            del cfg[section][leaf]
    return cfg


def fingerprint(recipe: DictConfig, stage: str, _memo: dict[str, str] | None = None) -> str:
    memo = {} if _memo is None else _memo
    if stage not in memo:
        spec = STAGES[stage]
        memo[stage] = files.sha256_of(
            {
                "stage": stage,
                "version": spec.version,
                "config": stage_config(recipe, stage),
                "inputs": {d: fingerprint(recipe, d, memo) for d in spec.upstream(recipe.stages)},
            }
        )
    return memo[stage]


def status(recipe: DictConfig, stage: str) -> tuple[bool, str]:
    """(current?, why not) for one stage of a recipe."""
    m = read(recipe.workdir, stage)
    if m is None:
        return False, "not run yet"
    if m.get("fingerprint") != fingerprint(recipe, stage):
        changed = [k for k, v in stage_config(recipe, stage).items() if m.get("config", {}).get(k) != v]
        if changed:
            return False, "changed: " + ", ".join(changed)
        return False, "an upstream stage or the stage's code changed"
    missing = [o for o in m.get("outputs", []) if not (Path(recipe.workdir) / o).exists()]
    if missing:
        return False, f"output missing: {missing[0]}"
    return True, "up to date"


def write(
    recipe: DictConfig,
    stage: str,
    outputs: list[str],
    summary: dict[str, Any],
    started: float,
    world_size: int,
) -> dict[str, Any]:
    spec = STAGES[stage]
    data = {
        "stage": stage,
        "version": spec.version,
        "fingerprint": fingerprint(recipe, stage),
        "config": stage_config(recipe, stage),
        "inputs": {
            d: (read(recipe.workdir, d) or {}).get("fingerprint") for d in spec.upstream(recipe.stages)
        },
        "outputs": outputs,
        "summary": summary,
        "timings": {"started": started, "finished": time.time(), "wall_s": round(time.time() - started, 3)},
        "world_size": world_size,
        "host": platform.node(),
    }
    files.write_json(path(recipe.workdir, stage), data)
    return data


def remove(workdir: str | os.PathLike, stage: str) -> None:
    try:
        path(workdir, stage).unlink()
    except FileNotFoundError:
        pass
