"""megatron-core <= 0.15 RetroModel tensors under this toolkit's names.

Both models are built from megatron-core modules, so tensors keep their layouts (fused
q/k/v grouped per head, SwiGLU's two halves stacked in linear_fc1) and only three module
paths differ:
  decoder CCA       cross_attention.attn.*                 -> cross_attention.attention.*
  encoder layer CCA encoder.layers.J.cross_attention.attn.*  -> encoder.layers.J.cross_attention.*
  encoder MLP norm  encoder.layers.J.pre_mlp_layernorm.norm.* -> encoder.layers.J.pre_mlp_layernorm.*
Dist checkpoints also spell input_layernorm.* and pre_mlp_layernorm.* as
self_attention.linear_qkv.layer_norm_* and mlp.linear_fc1.layer_norm_*.
The model that reads them is model.flavor megatron_core: no decoder final norm, and the
encoder cross-attention's residual is the normalised stream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from retro_toolkit.checkpoint.megatron_files import load_shard
from retro_toolkit.errors import UserError

FLAVOR = "megatron_core"

_RULES = (
    # dist checkpoints name the norms in front of q/k/v and fc1 as Transformer Engine's fused
    # layers hold them (megatron-core's sharded_state_dict_keys_map), whichever spec trained.
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$"), r".input_layernorm.\1"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r".pre_mlp_layernorm.\1"),
    (re.compile(r"(\.cross_attention\.encoder\.layers\.\d+\.)cross_attention\.attn\."), r"\1cross_attention."),
    (re.compile(r"(\.cross_attention\.encoder\.layers\.\d+\.)pre_mlp_layernorm\.norm\."), r"\1pre_mlp_layernorm."),
    (re.compile(r"^(decoder\.layers\.\d+\.cross_attention\.)attn\."), r"\1attention."),
)


def rename(name: str) -> str:
    """One megatron-core RetroModel tensor name as this toolkit's model spells it."""
    for pattern, repl in _RULES:
        name = pattern.sub(repl, name)
    return name


def to_toolkit(state: dict[str, Any]) -> dict[str, Any]:
    """A megatron-core RetroModel state dict (TP 1, no _extra_state) under this toolkit's names."""
    return {rename(k): v for k, v in state.items() if not k.endswith("_extra_state")}


def read_dist(sub: Path, trust: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training args, model tensors under our names) of one megatron-core dist checkpoint folder.

    torch_dist stores every tensor whole, whatever tensor-parallel size wrote it, so the
    tensors are read at their global shapes; optimizer state is skipped. The args come from
    common.pt, loaded like a legacy shard (weights_only unless `trust`).
    """
    from retro_toolkit.core import files

    meta = files.read_json(sub / "metadata.json")
    if meta.get("sharded_backend") != "torch_dist":
        raise UserError(f"{sub}/metadata.json names sharded_backend {meta.get('sharded_backend')!r}; only "
                        "megatron-core's torch_dist format is read. Re-save the checkpoint with "
                        "--ckpt-format torch_dist.")
    common_file = sub / "common.pt"
    if not common_file.is_file():
        raise UserError(f"{sub} has no common.pt, where Megatron-LM keeps the training args.")
    common = load_shard(common_file, trust)
    args = common.get("args")
    if args is None:
        raise UserError(f"{common_file} holds no 'args': not a Megatron-LM training checkpoint.")
    args = dict(args) if isinstance(args, dict) else vars(args)
    return args, to_toolkit(read_dist_tensors(sub))


def read_dist_tensors(sub: Path) -> dict[str, Any]:
    """Every model tensor of a dist checkpoint folder at its global shape, under its saved name."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(sub))
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in reader.read_metadata().state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")
               and not k.endswith("_extra_state")}
    if not tensors:
        raise UserError(f"{sub} holds no model tensors.")
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return unstack_layers(tensors)


_STACKED = re.compile(r"^(.*\blayers)\.(?!\d)(.+)$")


def unstack_layers(tensors: dict[str, Any]) -> dict[str, Any]:
    """megatron-core saves a block of identical layers (a GPT's) as one tensor per name with the
    layer as its first axis ("decoder.layers.mlp.linear_fc1.weight" [L, ...]); give each layer
    its own name ("decoder.layers.<i>.mlp.linear_fc1.weight"), as heterogeneous blocks (Retro's) save."""
    out = {}
    for name, t in tensors.items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = t
        else:
            out.update({f"{m[1]}.{i}.{m[2]}": layer for i, layer in enumerate(t.unbind(0))})
    return out
