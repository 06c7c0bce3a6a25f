"""Recipes: schema, composition of yaml/ pieces, command-line overrides, validation.

Nothing here imports torch: validating or dry-running a 48B recipe stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_recipe", "to_yaml"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the stages' configs import recipe.fields, and composing imports them.
    if name in __all__:
        from retro_toolkit.recipe import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'retro_toolkit.recipe' has no attribute {name!r}")
