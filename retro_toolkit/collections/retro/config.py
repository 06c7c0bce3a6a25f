"""RetroConfig: megatron-core's TransformerConfig plus the Retro settings.

`config_from_model_section` turns a recipe's `model:` section into a RetroConfig and the
few GPTModel arguments that are not TransformerConfig fields (vocabulary, sequence
length, embedding tying), so every stage builds the model the same way.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.transformer.transformer_config import TransformerConfig

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.model import ADDED_KEYS, Arch, Flavor, ModelConfig, PositionType, RetroSettings, default_cca_layers
from retro_toolkit.recipe.model import check as check_model


def stored_model_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """A model section read back from a checkpoint or package, with every key it predates set
    to the behaviour its weights were trained with: the ADDED_KEYS at their old values, and
    encoder_rotary as a RoPE Retro had it before the key existed (on). num_query_groups equal to
    the heads is written as null, so the two spellings of multi-head attention compare equal."""
    out = dict(section)
    for key, value in ADDED_KEYS:
        out.setdefault(key, value)
    out.setdefault("encoder_rotary", out.get("position_embedding_type", "rope") == "rope")
    if out.get("num_query_groups") == out.get("num_attention_heads"):
        out["num_query_groups"] = None  # a key/value head per query head is multi-head attention
    return out


CoreAttention = Literal["sdpa", "unfused"]


@dataclass
class RetroConfig(TransformerConfig, RetroSettings):
    """TransformerConfig with the recipe's Retro settings (recipe/model.py) as fields."""

    # Neighbour token id masked like -1 (document-end padding), if the data uses one.
    neighbor_pad_id: Optional[int] = None
    # Attention of the local specs: "sdpa" (torch scaled_dot_product_attention, our rotary
    # embedding) or "unfused" (megatron-core's DotProductAttention and rotary embedding:
    # materialised scores, bit-compatible with upstream's local spec).
    core_attention: CoreAttention = "sdpa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cca_layers is None:
            self.cca_layers = default_cca_layers(self.num_layers)
        self.cca_layers = sorted(int(x) for x in self.cca_layers)
        bad = [x for x in self.cca_layers if not 1 <= x <= self.num_layers]
        if bad or len(set(self.cca_layers)) != len(self.cca_layers):
            raise UserError(
                f"model.cca_layers {self.cca_layers} must be distinct 1-based layer numbers between 1 "
                f"and num_layers ({self.num_layers}); null picks Retro's rule "
                f"({default_cca_layers(self.num_layers) or 'none for fewer than 6 layers'})."
            )
        for key, choices in (("flavor", Flavor), ("position_embedding_type", PositionType),
                             ("core_attention", CoreAttention)):
            if getattr(self, key) not in typing.get_args(choices):
                raise UserError(f"model.{key} must be one of {', '.join(typing.get_args(choices))} "
                                f"(got {getattr(self, key)!r}).")
        if self.encoder_rotary and self.position_embedding_type != "rope":
            raise UserError("model.encoder_rotary needs model.position_embedding_type rope (it is "
                            f"{self.position_embedding_type!r}); set encoder_rotary false.")
        for key in ("chunk_length", "num_neighbors", "num_retrieved_chunks", "encoder_num_layers"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be at least 1 (got {getattr(self, key)}).")

    def multi_head(self) -> "RetroConfig":
        """This config with one key/value head per query head: cross-attention's (megatron-core's
        CrossAttention has no grouped-query attention, and Retro's never had it)."""
        if self.num_query_groups == self.num_attention_heads:
            return self
        return dataclasses.replace(self, num_query_groups=self.num_attention_heads)

    @property
    def retrieved_length(self) -> int:
        """Tokens per neighbour (r)."""
        return self.num_retrieved_chunks * self.chunk_length

    def encoder_config(self) -> "RetroConfig":
        """The neighbour encoder's config: same widths, its own depth and dropouts."""
        return dataclasses.replace(
            self,
            num_layers=self.encoder_num_layers,
            hidden_dropout=self.encoder_hidden_dropout,
            attention_dropout=self.encoder_attention_dropout,
            cca_layers=[],
        )


@dataclass(frozen=True)
class ModelArgs:
    """GPTModel arguments that are not TransformerConfig fields."""

    arch: str
    vocab_size: int
    max_sequence_length: int
    share_embeddings_and_output_weights: bool


def cpu_flags() -> dict[str, Any]:
    """TransformerConfig settings local specs need on a machine without CUDA: CPU initialisation,
    and none of the fused kernels (each is CUDA-only)."""
    if torch.cuda.is_available():
        return {}
    fusions = ("bias_dropout_fusion", "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm",
               "gradient_accumulation_fusion", "apply_rope_fusion")
    return {"use_cpu_initialization": True, **dict.fromkeys(fusions, False)}


def inference_overrides(dtype: torch.dtype, device: torch.device | str | None = None) -> dict[str, Any]:
    """TransformerConfig fields of a model that only evaluates loaded weights: dropout off, and
    parameters allocated once, uninitialised, in `dtype` on `device` (default: CUDA when present).
    Loading the weights is then the only write to them, so building costs no time and the
    model's memory is its size in `dtype` from the start (a 48B model in bf16 fits where its
    fp32 build would not)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dict(
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        perform_initialization=False,
        use_cpu_initialization=device.type == "cpu",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        encoder_hidden_dropout=0.0,
        encoder_attention_dropout=0.0,
    )


# TransformerConfig fields whose recipe keys have other names (Megatron-LM's argument names).
_RENAMED = {"apply_layernorm_1p": "layernorm_zero_centered_gamma", "swiglu": "gated_linear_unit"}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RetroConfig)}


def config_from_model_section(
    model: Mapping[str, Any], vocab_size: Optional[int] = None, **overrides: Any
) -> tuple[RetroConfig, ModelArgs]:
    """Build (RetroConfig, ModelArgs) from a recipe's `model` section (DictConfig or dict).

    Keys the section leaves out take ModelConfig's defaults; keys that are RetroConfig fields
    pass by name. `vocab_size` is the tokenizer's; it is used when the section leaves
    vocab_size null. `overrides` are extra TransformerConfig fields (parallel sizes, dtypes, ...).
    """
    m = {**dataclasses.asdict(ModelConfig()), **dict(model.items())}
    if m["arch"] not in typing.get_args(Arch):
        raise UserError(f"model.arch must be 'retro' or 'gpt' (got {m['arch']!r}).")
    vocab = m["vocab_size"] or vocab_size
    if not vocab:
        raise UserError("model.vocab_size is null and no tokenizer vocabulary size was given: set model.vocab_size.")
    if m["arch"] == "gpt":
        m["cca_layers"] = []
    check_model(m)
    kwargs: dict[str, Any] = {_RENAMED.get(k, k): v for k, v in m.items() if _RENAMED.get(k, k) in _CONFIG_FIELDS}
    kwargs["activation_func"] = F.silu if m["swiglu"] else squared_relu if m["squared_relu"] else F.gelu
    kwargs.update(cpu_flags())
    kwargs.update(overrides)
    config = RetroConfig(**kwargs)
    args = ModelArgs(
        arch=m["arch"],
        vocab_size=int(vocab),
        max_sequence_length=m["seq_length"],
        share_embeddings_and_output_weights=not m["untie_embeddings_and_output_weights"],
    )
    return config, args
