"""The generic half of validation: a recipe's values against the schema's dataclasses.

It walks the dataclasses itself (rather than relying on OmegaConf's merge errors) so that
every message carries the full key, list indices included, the offending value, the
expected type or choices and the nearest valid key. Integer ranges come from the fields'
`bounded` metadata, path fields become absolute (recipe/fields.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import INT64, bounds

_MISSING = "???"


def abspath(p: str) -> str:
    return str(Path(os.path.expanduser(p)).resolve())


def choice_error(key: str, value: str, choices: typing.Sequence[str]) -> UserError:
    hint = difflib.get_close_matches(value, list(choices), n=1)
    return UserError(f"recipe key '{key}' = '{value}' is not one of {', '.join(choices)}."
                     + (f" Did you mean '{hint[0]}'?" if hint else ""))


def check_exists(value: str | None, key: str, hint: str) -> None:
    """A path key names something that exists; `hint` ends the message. Validation made every
    path absolute, so a relative value is one of the key's words (e.g. "sft") or a builtin."""
    if value and os.path.isabs(value) and not Path(value).exists():
        raise UserError(f"recipe key '{key}' points to {value}, which does not exist{hint}")


def check_data_file(path: str, key: str) -> None:
    """A data key names a bundled file or an existing file."""
    if path.startswith("builtin:"):
        from retro_toolkit.data import BUILTIN_FILES

        if path not in BUILTIN_FILES:
            raise UserError(f"recipe key '{key}' = {path!r} is not a bundled file; bundled: {', '.join(BUILTIN_FILES)}.")
    elif not Path(path).is_file():
        raise UserError(f"recipe key '{key}' points to {path}, which does not exist or is not a file.")


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, for 'did you mean' across sections."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += all_keys(t, key + ".")
    return out


def _nearest(key: str, candidates: list[str], full_candidates: list[str]) -> str:
    local = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if local:
        return local[0]
    leaf = key.rsplit(".", 1)[-1]
    for cand in full_candidates:  # same name in another section (e.g. top-level vocab_size)
        if cand.rsplit(".", 1)[-1] == leaf:
            return cand
    hits = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in full_candidates], n=1)
    return next((c for c in full_candidates if hits and c.endswith("." + hits[0])), "")


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    if origin is dict or dataclasses.is_dataclass(t):
        return "a mapping"
    if origin is Literal:
        return "str"
    return getattr(t, "__name__", str(t))


def _shown(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:37]}... ({len(str(abs(value)))} digits)"


def _check_bounds(value: int, key: str, f: dataclasses.Field | None) -> None:
    lo, hi, why = bounds(f) if f is not None else INT64
    if value < lo:
        raise UserError(f"recipe key '{key}' must be at least {lo} (got {_shown(value)}).")
    if value > hi:
        raise UserError(f"recipe key '{key}' must be at most {hi:,} (got {_shown(value)}): {why}.")


class Checker:
    """Checks values against a root dataclass (whose keys it suggests for typos). With
    `ranges=False` integer ranges and finiteness are not checked: the sections of stages a
    recipe does not run may keep placeholders."""

    def __init__(self, root_cls: type) -> None:
        self.full_keys = all_keys(root_cls)

    def check(self, value: Any, t: Any, key: str, f: dataclasses.Field | None = None, ranges: bool = True) -> Any:
        if isinstance(value, str) and value == _MISSING:
            raise UserError(f"recipe key '{key}' is required but not set. Set it in the recipe or as {key}=...")
        origin = typing.get_origin(t)
        if t is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            return None if value is None else self.check(value, args[0], key, f, ranges)
        if dataclasses.is_dataclass(t):
            return self.check_dataclass(value, t, key, ranges)
        if origin is list:
            if not isinstance(value, list):
                self._wrong(key, value, t)
            (item_t,) = typing.get_args(t)
            return [self.check(v, item_t, f"{key}[{i}]", f, ranges) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self._wrong(key, value, t)
            return {str(k): self.check(v, typing.get_args(t)[1], f"{key}.{k}") for k, v in value.items()}
        if origin is Literal:
            if not isinstance(value, str):
                self._wrong(key, value, t)
            if value not in typing.get_args(t):
                raise choice_error(key, value, typing.get_args(t))
            return value
        if t is bool:
            if not isinstance(value, bool):
                self._wrong(key, value, t)
            return value
        if t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self._wrong(key, value, t)
            if ranges:
                _check_bounds(value, key, f)
            return value
        if t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self._wrong(key, value, t)
            if ranges and not math.isfinite(value):
                raise UserError(f"recipe key '{key}' must be a finite number (got {value}).")
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)) or value is None:
                self._wrong(key, value, t)
            value = str(value)
            words = f.metadata.get("path") if f is not None else None
            if words is not None and not value.startswith("builtin:") and value not in words:
                value = abspath(value)
            return value
        raise TypeError(f"schema type {t} of {key} is not supported")  # a bug in the schema

    def check_dataclass(self, value: Any, cls: type, key: str, ranges: bool = True,
                        unranged: frozenset[str] = frozenset()) -> dict[str, Any]:
        """`unranged`: fields whose values skip range checks."""
        if not isinstance(value, dict):
            self._wrong(key, value, cls)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = f"{key}." if key else ""
        for k in value:
            if k not in names:
                near = _nearest(str(k), names, self.full_keys)
                if near and "." not in near:
                    near = prefix + near
                raise UserError(
                    f"unknown recipe key '{prefix}{k}'."
                    + (f" Did you mean '{near}'?" if near else "")
                    + f" Valid keys here: {', '.join(prefix + n for n in names)}."
                )
        out = {}
        for f in dataclasses.fields(cls):
            sub = prefix + f.name
            if f.name in value:
                out[f.name] = self.check(value[f.name], hints[f.name], sub, f, ranges and f.name not in unranged)
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = OmegaConf.to_container(OmegaConf.create({"v": f.default_factory()}))["v"]
            else:
                raise UserError(f"recipe key '{sub}' is required but not set. Set it in the recipe or as {sub}=...")
        return out

    @staticmethod
    def _wrong(key: str, value: Any, t: Any) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise UserError(
            f"recipe key '{key}' has the wrong type: got {shown} ({type(value).__name__}), "
            f"expected {_type_name(t)}."
        )
