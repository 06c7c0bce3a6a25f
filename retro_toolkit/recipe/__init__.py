"""Recipes: schema, composition of yaml/ pieces, command-line overrides, validation.

Nothing here imports torch: validating or dry-running a 48B recipe stays fast.
"""

from retro_toolkit.recipe.compose import load_recipe, to_yaml

__all__ = ["load_recipe", "to_yaml"]
