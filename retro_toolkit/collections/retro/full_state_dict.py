"""Unsharded (tensor-parallel size 1) weights into a model's tensor-parallel shards.

A full state dict (an imported or exported checkpoint, a reference model's weights) loads
into any tensor-parallel size: each rank takes its slice of every partitioned weight, by
the partition marks megatron-core sets on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
from torch import Tensor

from retro_toolkit.errors import UserError

if TYPE_CHECKING:
    from retro_toolkit.collections.retro.model import RetroModel


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """megatron-core 0.16.1 marks a tensor-parallel weight's partition (tensor_model_parallel,
    partition_dim, partition_stride) only while initialising it (tensor_parallel/layers.py), so
    a model built uninitialised to load weights into would look unpartitioned to whatever reads
    the marks (load_full_state_dict slices by them). Mark them as initialisation would have."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    dims = ((VocabParallelEmbedding, 0), (ColumnParallelLinear, 0), (RowParallelLinear, 1))
    for module in model.modules():
        dim = next((d for cls, d in dims if isinstance(module, cls)), None)
        weight = getattr(module, "weight", None)
        if dim is not None and isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "partition_dim"):
            set_tensor_model_parallel_attributes(weight, True, dim, getattr(module, "stride", 1))


def load_full_state_dict(model: RetroModel, full: Mapping[str, Tensor],
                         after_copy: Optional[Callable[[str], None]] = None,
                         missing_ok: Callable[[str], bool] = lambda name: False) -> None:
    """Load an unsharded (tensor-parallel size 1) state dict into this rank's shards.

    Each tensor-parallel parameter takes its slice along megatron-core's partition_dim; a
    gated (SwiGLU) fc1 keeps each rank's slice of both halves, as megatron-core lays it out.
    Tensors are copied one at a time into the model's own (converting dtype), and
    `after_copy(name)` runs after each: a memory-mapped source gives its pages back there.
    A tensor `full` lacks is an error unless `missing_ok(name)` (it keeps its initial value).
    """
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    own = model.state_dict()
    params = dict(model.named_parameters())
    for name, value in own.items():
        if name not in full:
            if name.endswith("_extra_state") or missing_ok(name):
                continue
            raise UserError(f"{name} is missing from the full state dict")
        src = full[name]
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False) and size > 1:
            dim = p.partition_dim
            if model.config.gated_linear_unit and ".mlp.linear_fc1." in name:
                halves = torch.chunk(src, 2, dim=dim)
                src = torch.cat([torch.chunk(h, size, dim=dim)[rank] for h in halves], dim=dim)
            else:
                src = torch.chunk(src, size, dim=dim)[rank]
        if src.shape != value.shape:
            raise UserError(f"{name}: the saved tensor gives a shard of shape {tuple(src.shape)} but this model's "
                            f"parameter is {tuple(value.shape)}: the weights belong to another model size.")
        with torch.no_grad():
            value.copy_(src)
        if after_copy is not None:
            after_copy(name)
