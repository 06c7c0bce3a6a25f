"""RetroConfig: megatron-core's TransformerConfig plus the Retro settings.

`config_from_model_section` turns a recipe's `model:` section into a RetroConfig and the
few GPTModel arguments that are not TransformerConfig fields (vocabulary, sequence
length, embedding tying), so every stage builds the model the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from retro_toolkit.core.cca import default_cca_layers
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.schema import MODEL_FLAVORS, POSITION_TYPES


def stored_model_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """A model section read back from a checkpoint or package, with every key it predates set
    to the behaviour its weights were trained with (before `encoder_rotary` existed, a RoPE
    Retro rotated its encoder's self-attention; before `flavor`, it was megatron_legacy)."""
    out = dict(section)
    out.setdefault("flavor", "megatron_legacy")
    out.setdefault("encoder_rotary", out.get("position_embedding_type", "rope") == "rope")
    return out


@dataclass
class RetroConfig(TransformerConfig):
    # Tokens per chunk (m); the sequence length must be a multiple of it.
    chunk_length: int = 64
    # Neighbours per chunk (k).
    num_neighbors: int = 2
    # Chunks per neighbour: the retrieved chunk plus its continuation (r = this * m tokens).
    num_retrieved_chunks: int = 2
    encoder_num_layers: int = 2
    encoder_hidden_dropout: float = 0.1
    encoder_attention_dropout: float = 0.1
    # 1-based decoder layers with chunked cross-attention; None = default_cca_layers.
    # An empty list is the GPT twin.
    cca_layers: Optional[list[int]] = None
    # Scales the CCA output; 0 skips the encoder and CCA entirely (decoder only).
    retrieval_gate: float = 1.0
    # Rotary positions inside chunked cross-attention: query row j of a chunk sits at m-1+j,
    # neighbour token t at t, so "copy the neighbour token one step ahead" is a fixed
    # relative offset (RETRO's relative positions in CCA). Off = position-free CCA, as in
    # Megatron-LM's Retro and InstructRetro's released checkpoints.
    cca_rotary: bool = False
    # A final norm on the neighbour encoder's output (Megatron-LM's retriever has none).
    encoder_final_norm: bool = False
    # Rotary positions in the neighbour encoder's self-attention (the decoder's settings,
    # positions 0..r-1 within each neighbour). Off = both upstreams: neither Megatron-LM's
    # legacy retriever nor megatron-core's Retro encoder gets a rotary embedding.
    encoder_rotary: bool = False
    # Where the two upstream implementations differ: "megatron_legacy" (Megatron-LM's
    # InstructRetro model: a final norm after the decoder; the encoder's cross-attention adds
    # to the un-normalised neighbour states) or "megatron_core" (megatron-core <= 0.15's
    # RetroModel: no decoder final norm; that residual is the normalised neighbour states).
    flavor: str = "megatron_legacy"
    # Start chunked cross-attention's output projection at zero (a fresh run or init_from): the
    # model then begins as exactly its GPT twin and drifts from it only as far as retrieval
    # helps the loss. Off = Megatron-LM's scaled-normal init of that projection.
    cca_zero_init: bool = False
    # Neighbour token id masked like -1 (document-end padding), if the data uses one.
    neighbor_pad_id: Optional[int] = None
    # Attention of the local specs: "sdpa" (torch scaled_dot_product_attention, our rotary
    # embedding) or "unfused" (megatron-core's DotProductAttention and rotary embedding:
    # materialised scores, bit-compatible with upstream's local spec).
    core_attention: str = "sdpa"
    # Read by GPTModel when present on the config.
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = 10000

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
        if self.flavor not in MODEL_FLAVORS:
            raise UserError(f"model.flavor must be one of {', '.join(MODEL_FLAVORS)} (got {self.flavor!r}).")
        if self.position_embedding_type not in POSITION_TYPES:
            raise UserError(f"model.position_embedding_type must be one of {', '.join(POSITION_TYPES)} "
                            f"(got {self.position_embedding_type!r}).")
        if self.encoder_rotary and self.position_embedding_type != "rope":
            raise UserError("model.encoder_rotary needs model.position_embedding_type rope (it is "
                            f"{self.position_embedding_type!r}); set encoder_rotary false.")
        if self.core_attention not in ("sdpa", "unfused"):
            raise UserError(f"model.core_attention must be 'sdpa' or 'unfused' (got {self.core_attention!r}).")
        for key in ("chunk_length", "num_neighbors", "num_retrieved_chunks", "encoder_num_layers"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be at least 1 (got {getattr(self, key)}).")

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
    """TransformerConfig settings local specs need on a machine without CUDA."""
    if torch.cuda.is_available():
        return {}
    return dict(
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )


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


def config_from_model_section(
    model: Mapping[str, Any], vocab_size: Optional[int] = None, **overrides: Any
) -> tuple[RetroConfig, ModelArgs]:
    """Build (RetroConfig, ModelArgs) from a recipe's `model` section (DictConfig or dict).

    `vocab_size` is the tokenizer's; it is used when the section leaves vocab_size null.
    `overrides` are extra TransformerConfig fields (parallel sizes, dtypes, ...).
    """
    m = dict(model.items())
    get = m.get
    arch = get("arch", "retro")
    if arch not in ("retro", "gpt"):
        raise UserError(f"model.arch must be 'retro' or 'gpt' (got {arch!r}).")
    vocab = get("vocab_size") or vocab_size
    if not vocab:
        raise UserError("model.vocab_size is null and no tokenizer vocabulary size was given: set model.vocab_size.")
    seq = int(get("seq_length", 2048))
    chunk = int(get("chunk_length", 64))
    if seq % chunk:
        raise UserError(
            f"model.seq_length ({seq}) must be a multiple of model.chunk_length ({chunk}): "
            "Retro splits every sample into whole chunks."
        )
    position = str(get("position_embedding_type", "rope"))
    retrieved = int(get("num_retrieved_chunks", 2)) * chunk
    if position == "learned_absolute" and arch == "retro" and retrieved > seq:
        raise UserError(
            f"model.position_embedding_type learned_absolute gives each neighbour token its position 0..r-1 "
            f"from the same table as the decoder, so r = num_retrieved_chunks * chunk_length ({retrieved}) "
            f"must not exceed model.seq_length ({seq}). Lower num_retrieved_chunks or raise seq_length."
        )
    num_layers = int(get("num_layers"))
    cca = get("cca_layers")
    cca = list(cca) if cca is not None else None
    if arch == "gpt":
        cca = []
    elif (cca if cca is not None else default_cca_layers(num_layers)) == []:
        raise UserError(
            f"model.num_layers is {num_layers}: Retro's rule puts chunked cross-attention in layers 6, 9, "
            "... so a model this shallow has none. Set model.cca_layers to an explicit list, e.g. [2]."
        )
    swiglu = bool(get("swiglu", False))
    kwargs: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=int(get("hidden_size")),
        num_attention_heads=int(get("num_attention_heads")),
        ffn_hidden_size=int(get("ffn_hidden_size")),
        hidden_dropout=float(get("hidden_dropout", 0.1)),
        attention_dropout=float(get("attention_dropout", 0.1)),
        init_method_std=float(get("init_method_std", 0.02)),
        layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)),
        normalization=str(get("normalization", "LayerNorm")),
        layernorm_zero_centered_gamma=bool(get("apply_layernorm_1p", False)),
        add_bias_linear=bool(get("add_bias_linear", True)),
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        chunk_length=chunk,
        num_neighbors=int(get("num_neighbors", 2)),
        num_retrieved_chunks=int(get("num_retrieved_chunks", 2)),
        encoder_num_layers=int(get("encoder_num_layers", 2)),
        encoder_hidden_dropout=float(get("encoder_hidden_dropout", 0.1)),
        encoder_attention_dropout=float(get("encoder_attention_dropout", 0.1)),
        cca_layers=cca,
        retrieval_gate=float(get("retrieval_gate", 1.0)),
        cca_rotary=bool(get("cca_rotary", False)),
        encoder_final_norm=bool(get("encoder_final_norm", False)),
        encoder_rotary=bool(get("encoder_rotary", False)),
        flavor=str(get("flavor", "megatron_legacy")),
        cca_zero_init=bool(get("cca_zero_init", False)),
        position_embedding_type=position,
        rotary_percent=float(get("rotary_percent", 1.0)),
        rotary_base=int(get("rotary_base", 10000)),
        tensor_model_parallel_size=int(get("tensor_model_parallel_size", 1)),
    )
    kwargs.update(cpu_flags())
    kwargs.update(overrides)
    config = RetroConfig(**kwargs)
    args = ModelArgs(
        arch=arch,
        vocab_size=int(vocab),
        max_sequence_length=seq,
        share_embeddings_and_output_weights=not bool(get("untie_embeddings_and_output_weights", False)),
    )
    return config, args
