"""Stage manifests: `<workdir>/stages/<stage>.json`, written last by a finished stage.

A stage is current when its manifest exists, its fingerprint (hash of the stage's
recipe keys, its code version and its upstream fingerprints) equals the one the recipe
gives now, and the outputs it lists are still on disk. Like make, a changed key reruns
the stage and, through the fingerprint chain, everything downstream.

One exception keeps trained models current when their database is updated: a stage with
`update_keys` (build_db: retrieval.extra_sources, retrieval.remove_sources) gives the
stages that train on it the fingerprint of the build that searched their neighbours, which
`stages/<stage>.pin.json` keeps while the rest of its configuration (its "base") is
unchanged; stages that read the current database (`reads_database`) see its fingerprint
as the input "database" once it differs from that.
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


def _drop_defaults(cfg: dict[str, Any], keys) -> dict[str, Any]:
    for key, default in keys:
        section, _, leaf = key.rpartition(".")
        if isinstance(cfg.get(section), dict) and cfg[section].get(leaf) == default:
            del cfg[section][leaf]
    return cfg


def stage_config(recipe: DictConfig, stage: str) -> dict[str, Any]:
    cfg = {}
    for key in STAGES[stage].config_keys:
        node = OmegaConf.select(recipe, key)
        cfg[key] = OmegaConf.to_container(node) if isinstance(node, (DictConfig,)) or OmegaConf.is_list(node) else node
    return _drop_defaults(cfg, STAGES[stage].added_keys)


def _base_config(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A stage's configuration with its update keys at their defaults."""
    cfg = json.loads(json.dumps(cfg))
    for key, default in STAGES[stage].update_keys:
        section, _, leaf = key.rpartition(".")
        if isinstance(cfg.get(section), dict):
            cfg[section][leaf] = default
    return _drop_defaults(cfg, STAGES[stage].added_keys)


def _hash(stage: str, version: int, config: dict[str, Any], inputs: dict[str, Any]) -> str:
    return files.sha256_of({"stage": stage, "version": version, "config": config, "inputs": inputs})


def inputs(recipe: DictConfig, stage: str, memo: dict[str, str] | None = None) -> dict[str, str]:
    """The fingerprints a stage's own is made of: its upstream stages', and the current database's."""
    memo = {} if memo is None else memo
    spec = STAGES[stage]
    out = {d: trained_fingerprint(recipe, d, memo) for d in spec.upstream(recipe.stages)}
    for d in (d for d in recipe.stages if STAGES[d].update_keys and spec.reads_database):
        current = fingerprint(recipe, d, memo)
        if current != trained_fingerprint(recipe, d, memo):
            out["database"] = current
    return out


def fingerprint(recipe: DictConfig, stage: str, _memo: dict[str, str] | None = None) -> str:
    memo = {} if _memo is None else _memo
    if stage not in memo:
        memo[stage] = _hash(stage, STAGES[stage].version, stage_config(recipe, stage), inputs(recipe, stage, memo))
    return memo[stage]


def pin_path(workdir: str | os.PathLike, stage: str) -> Path:
    return Path(workdir) / "stages" / f"{stage}.pin.json"


def base_fingerprint(recipe: DictConfig, stage: str, memo: dict[str, str] | None = None) -> str:
    cfg = _base_config(stage, stage_config(recipe, stage))
    return _hash(stage, STAGES[stage].version, cfg, inputs(recipe, stage, memo))


def pin(recipe: DictConfig, stage: str) -> dict[str, str] | None:
    """The fingerprint trained models saw, with the base it holds for. A work directory from
    before pins existed has its manifest's (when the base still matches, that is the build
    its neighbours came from)."""
    try:
        return files.read_json(pin_path(recipe.workdir, stage))
    except (OSError, ValueError):
        pass
    m = read(recipe.workdir, stage)
    if not m or "config" not in m:
        return None
    return {"fingerprint": m.get("fingerprint"),
            "base": _hash(stage, m.get("version", 1), _base_config(stage, m["config"]), m.get("inputs", {}))}


def _holding_pin(recipe: DictConfig, stage: str, memo: dict[str, str] | None = None) -> dict[str, str] | None:
    """The stage's pin where it holds for this recipe: the stage takes updates, the recipe does
    not ask trained stages to follow them, and the base is the pinned one."""
    spec = STAGES[stage]
    if not spec.update_keys or (spec.follow_updates and OmegaConf.select(recipe, spec.follow_updates[0])
                                == spec.follow_updates[1]):
        return None
    p = pin(recipe, stage)
    return p if p and p["base"] == base_fingerprint(recipe, stage, memo) else None


def trained_fingerprint(recipe: DictConfig, stage: str, memo: dict[str, str] | None = None) -> str:
    """What stages that train on `stage` take as its fingerprint (see the module's docstring)."""
    memo = {} if memo is None else memo
    key = f"{stage}@trained"
    if key not in memo:
        p = _holding_pin(recipe, stage, memo)
        memo[key] = p["fingerprint"] if p else fingerprint(recipe, stage, memo)
    return memo[key]


def keeps_trained(recipe: DictConfig, stage: str) -> bool:
    """Whether a run of `stage` must keep what trained models read."""
    return _holding_pin(recipe, stage) is not None


def write_pin(recipe: DictConfig, stage: str) -> None:
    files.write_json(pin_path(recipe.workdir, stage), {"fingerprint": fingerprint(recipe, stage),
                                                       "base": base_fingerprint(recipe, stage)})


def _changed(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Changed keys, one level into a section (retrieval.extra_sources, not retrieval)."""
    out = []
    for k, v in now.items():
        old = before.get(k)
        if old == v:
            continue
        if isinstance(v, dict) and isinstance(old, dict):
            out += [f"{k}.{leaf}" for leaf in sorted(set(v) | set(old)) if v.get(leaf) != old.get(leaf)]
        else:
            out.append(k)
    return out


def status(recipe: DictConfig, stage: str) -> tuple[bool, str]:
    """(current?, why not) for one stage of a recipe."""
    m = read(recipe.workdir, stage)
    if m is None:
        return False, "not run yet"
    if m.get("fingerprint") != fingerprint(recipe, stage):
        changed = _changed(stage_config(recipe, stage), m.get("config", {}))
        if changed:
            return False, "changed: " + ", ".join(changed)
        now = inputs(recipe, stage)
        if now.get("database") != m.get("inputs", {}).get("database") and now.get("database"):
            return False, "the database was updated"
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
        "inputs": inputs(recipe, stage),
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
