"""Retro's placement rule for chunked cross-attention, importable without torch (the
recipe validator checks a model's layout before any job is queued)."""

from __future__ import annotations


def default_cca_layers(num_layers: int) -> list[int]:
    """Retro's rule: CCA in layers 6, 9, 12, ... (<= 15 layers) else 9, 12, ... (1-based)."""
    first = 6 if num_layers <= 15 else 9
    return list(range(first, num_layers + 1, 3))
