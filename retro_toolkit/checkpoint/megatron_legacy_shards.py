"""Whole tensors from the tensor-parallel shards of a Megatron checkpoint (legacy names by
default; NeMo's megatron-core-named shards pass their own `Layout`).

Each rank's `model` dict is flattened to dotted names; column-parallel tensors are joined
along their output rows (SwiGLU's two halves kept apart: every rank's first halves, then
every rank's second halves), row-parallel ones along their inputs, and replicated ones
must be equal on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from retro_toolkit.errors import UserError

# Tensor-parallel layout of legacy tensors, by name suffix.
COLUMN_PARALLEL = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
                   "inter_attention.query.weight", "inter_attention.query.bias",
                   "inter_attention.key_value.weight", "inter_attention.key_value.bias",
                   "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                   "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("self_attention.dense.weight", "inter_attention.dense.weight", "mlp.dense_4h_to_h.weight")


@dataclass(frozen=True)
class Layout:
    """Which tensors are split along their output rows (column-parallel), which along their
    inputs (row-parallel), and the name part of SwiGLU's stacked fc1."""

    column: Callable[[str], bool]
    row: Callable[[str], bool]
    gated_fc1: str


LEGACY = Layout(lambda n: n.endswith(COLUMN_PARALLEL), lambda n: n.endswith(ROW_PARALLEL), ".mlp.dense_h_to_4h.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, its keys joined with dots under `prefix`."""
    return dict(_leaves(tree, prefix))


def _leaves(tree: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def merge_shards(shards: list[dict[str, Any]], swiglu: bool, where: Path, layout: Layout = LEGACY) -> dict[str, Any]:
    """Full tensors from tensor-parallel shards (flattened names, split as `layout` says)."""
    import torch

    names = set(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != names:
            diff = sorted(names ^ set(s))[:6]
            raise UserError(f"{where}: shard mp_rank_{i:02d} holds other tensors than mp_rank_00 ({diff}).")
    full: dict[str, Any] = {}
    for name in sorted(names):
        parts = [s[name] for s in shards]
        if not isinstance(parts[0], torch.Tensor):
            continue
        if len(parts) == 1:
            full[name] = parts[0]
        elif layout.column(name):
            if swiglu and layout.gated_fc1 in name:
                halves = [torch.chunk(p, 2, dim=0) for p in parts]
                full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                full[name] = torch.cat(parts, dim=0)
        elif layout.row(name):
            full[name] = torch.cat(parts, dim=1)
        else:  # replicated: norms, row-parallel biases, position embeddings
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise UserError(f"{where}: {name} should be identical on every tensor-parallel rank but differs; "
                                "the shards do not belong to one checkpoint.")
            full[name] = parts[0]
    return full
