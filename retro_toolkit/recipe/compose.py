"""Compose a recipe: its `defaults:` pieces from yaml/, its own body, command-line overrides.

    defaults:            # each entry puts yaml/<group>/<name>.yaml under key <group>
      - model: retro_tiny
      - executor: local
      - _self_           # where the recipe's own keys merge (last when omitted)

`executor=slurm` on the command line swaps a group's piece; `a.b=value` sets one key
(the value is parsed as YAML, so `x=[1,2]` is a list and `x=null` is None).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from retro_toolkit.errors import UserError
from retro_toolkit.recipe import paths
from retro_toolkit.recipe.validate import validate
from retro_toolkit.recipe.yaml_io import YamlProblem, load_yaml_text, read_yaml


def find_recipe(arg: str) -> Path:
    p = Path(arg)
    if p.is_file():
        return p.resolve()
    builtin = paths.builtin_root("recipes")
    for cand in (builtin / arg, builtin / f"{arg}.yaml"):
        if "/" not in arg and cand.is_file():
            return cand
    known = sorted(f.stem for f in builtin.glob("*.yaml"))
    hint = difflib.get_close_matches(p.stem, known, n=1)
    raise UserError(
        f"recipe file not found: {arg}. "
        + (f"Did you mean '{hint[0]}'? " if hint else "")
        + "Pass a path to a .yaml file or the name of a bundled recipe; "
        "`retro-run ls` lists them."
    )


def _check_override_values(dotted: list[str]) -> None:
    """Bound what OmegaConf's own YAML parser will expand in `key=value` arguments."""
    for ov in dotted:
        key, _, value = ov.partition("=")
        try:
            load_yaml_text(value)
        except YamlProblem as e:
            raise UserError(f"override '{key}=...': {e}") from None
        except yaml.YAMLError:
            pass  # OmegaConf reports its own parse errors, with the override


def _parse_overrides(overrides: list[str], group_names: set[str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into group swaps and dotted key overrides."""
    swaps: dict[str, str] = {}
    dotted: list[str] = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(
                f"override '{ov}' is not of the form key=value "
                "(e.g. tokenizer.vocab_size=4000 or executor=slurm)."
            )
        if "." not in key and key in group_names and value and not value.lstrip().startswith(("{", "[")):
            swaps[key] = value.strip()
        else:
            dotted.append(f"{key}={value}")
    return swaps, dotted


def _load_piece(group: str, name: str, roots: list[Path]) -> dict[str, Any]:
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return read_yaml(Path(name), f"{group} piece")
    for root in roots:
        f = root / group / f"{name}.yaml"
        if f.is_file():
            return read_yaml(f, f"{group} piece")
    known = sorted({f.stem for r in roots for f in (r / group).glob("*.yaml")})
    if not known:
        raise UserError(f"unknown group '{group}' in defaults: there is no yaml/{group}/ folder.")
    hint = difflib.get_close_matches(name, known, n=1)
    raise UserError(
        f"unknown {group} '{name}'"
        + (f"; did you mean '{hint[0]}'?" if hint else ".")
        + f" Known {group} pieces: {', '.join(known)} (or give a path to a .yaml file)."
    )


def _defaults(body: dict[str, Any], recipe_file: Path) -> list[tuple[str, str] | str]:
    raw = body.pop("defaults", []) or []
    if not isinstance(raw, list):
        raise UserError(f"'defaults' in {recipe_file} must be a list like [{{model: retro_tiny}}, _self_].")
    out: list[tuple[str, str] | str] = []
    for item in raw:
        if item == "_self_":
            out.append("_self_")
        elif isinstance(item, dict) and len(item) == 1:
            (group, name), = item.items()
            out.append((str(group), str(name)))
        else:
            raise UserError(
                f"bad entry {item!r} in 'defaults' of {recipe_file}: "
                "each entry is `group: name` (e.g. `model: retro_tiny`) or `_self_`."
            )
    return out


def compose(recipe: str, overrides: list[str] | None = None) -> tuple[DictConfig, Path]:
    """Merge defaults pieces, the recipe body and overrides; no schema check yet."""
    recipe_file = find_recipe(recipe)
    body = read_yaml(recipe_file, "recipe")
    entries = _defaults(body, recipe_file)
    roots = paths.yaml_roots(recipe_file)
    swaps, dotted = _parse_overrides(overrides or [], paths.groups(roots))

    listed = {e[0] for e in entries if isinstance(e, tuple)}
    entries += [(g, n) for g, n in swaps.items() if g not in listed]
    if "_self_" not in entries:
        entries.append("_self_")

    cfg = OmegaConf.create()
    for entry in entries:
        if entry == "_self_":
            layer: dict[str, Any] = body
        else:
            group, name = entry
            layer = {group: _load_piece(group, swaps.get(group, name), roots)}
        cfg = OmegaConf.merge(cfg, OmegaConf.create(layer))
    if dotted:
        _check_override_values(dotted)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
        except Exception as e:  # omegaconf's grammar errors
            raise UserError(f"cannot parse overrides {dotted}: {e}".splitlines()[0]) from None
    return cfg, recipe_file


def load_recipe(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose, check against the schema, resolve `${...}`: the recipe every stage sees."""
    cfg, recipe_file = compose(recipe, overrides)
    return validate(cfg, recipe_file)


def to_yaml(cfg: DictConfig) -> str:
    # PyYAML quotes strings that would read back as another type (e.g. time "01:00:00").
    return yaml.safe_dump(OmegaConf.to_container(cfg), sort_keys=False, allow_unicode=True)
