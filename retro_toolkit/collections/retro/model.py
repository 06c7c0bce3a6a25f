"""RetroModel and its GPT twin on megatron-core's GPTModel, called with plain tensors.

    from retro_toolkit.collections.retro import RetroModel, initialize, config_from_model_section
    initialize()                                   # process groups (world of one is fine)
    config, args = config_from_model_section(recipe.model, vocab_size=32000)
    model = RetroModel(config, args.vocab_size, args.max_sequence_length)
    logits = model(tokens, neighbor_tokens)        # [b, n] and [b, n/m, k, r] -> [b, n, vocab]

Neighbour ids of -1 (and config.neighbor_pad_id) are masked. The GPT twin is the same
decoder without CCA; a Retro state dict loads into it with strict=False (the unexpected
keys are exactly the CCA and encoder weights).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from retro_toolkit.collections.retro.config import ModelArgs, RetroConfig
from retro_toolkit.collections.retro.full_state_dict import mark_tensor_parallel_weights
from retro_toolkit.collections.retro.inference import RetroInferenceContext, completed_chunks, neighbor_mask
from retro_toolkit.collections.retro.specs import decoder_block_spec
from retro_toolkit.core import cpu
from retro_toolkit.errors import UserError


class RetroModel(GPTModel):
    """Retro decoder (GPT layers + CCA layers) with the neighbour encoder, shared embeddings."""

    def __init__(
        self,
        config: RetroConfig,
        vocab_size: int,
        max_sequence_length: int,
        share_embeddings_and_output_weights: bool = False,
        parallel_output: bool = True,
        pg_collection=None,
    ):
        cpu.apply()
        if config.pipeline_model_parallel_size > 1:
            raise UserError(
                "pipeline_model_parallel_size > 1 is not supported for Retro: the first CCA layer's encoded "
                "neighbours travel to every later CCA layer, and megatron-core's pipeline schedules only pass "
                "hidden states between stages. Use tensor parallelism instead."
            )
        if config.sequence_parallel:
            raise UserError(
                "sequence_parallel is not supported for Retro yet: chunked cross-attention regroups the "
                "sequence into chunks, which needs the whole sequence on every tensor-parallel rank. "
                "Set sequence_parallel false."
            )
        super().__init__(
            config=config,
            transformer_layer_spec=decoder_block_spec(config),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=config.position_embedding_type,
            rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base,
            rope_scaling=config.rope_scaling_factor is not None,
            rope_scaling_factor=config.rope_scaling_factor or 8.0,
            pg_collection=pg_collection,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron-core dist_checkpointing state, with one key per decoder layer.

        megatron-core stacks identical layers into one [num_layers, ...] tensor per key;
        Retro's layers differ (CCA layers have cross-attention, the first also the encoder),
        so every layer gets its own keys (`decoder.layers.<i>.`), as megatron-core's
        non_homogeneous_layers does. The GPT twin uses the same layout, so it loads a Retro
        checkpoint's decoder.
        """
        metadata = dict(metadata or {})
        metadata["non_homogeneous_layers"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    @property
    def has_retrieval(self) -> bool:
        return bool(self.config.cca_layers)

    def _check(self, tokens: Tensor, neighbor_tokens: Optional[Tensor]) -> None:
        c = self.config
        if tokens.dim() != 2:
            raise UserError(f"tokens must be [batch, seq_length]; got shape {tuple(tokens.shape)}.")
        b, n = tokens.shape
        if n % c.chunk_length:
            raise UserError(
                f"sequence length {n} is not a multiple of the chunk length {c.chunk_length}: Retro splits "
                "every sample into whole chunks. Pad or trim the tokens (or change model.seq_length)."
            )
        if n > self.max_sequence_length and self.position_embedding_type == "learned_absolute":
            raise UserError(f"sequence length {n} exceeds model.seq_length {self.max_sequence_length}.")
        if neighbor_tokens is None:
            return
        want = (b, n // c.chunk_length, c.num_neighbors, c.retrieved_length)
        got = tuple(neighbor_tokens.shape)
        if neighbor_tokens.dim() != 4:
            raise UserError(
                f"neighbor_tokens must be [batch, chunks, neighbours, retrieved tokens] = {want}; got {got}."
            )
        if got[2] != c.num_neighbors:
            raise UserError(
                f"neighbor_tokens has {got[2]} neighbours per chunk but the model was built with "
                f"model.num_neighbors = {c.num_neighbors}; query the index with the same k (shape {got}, "
                f"expected {want})."
            )
        if got != want:
            raise UserError(
                f"neighbor_tokens has shape {got}, expected {want}: [batch, seq/chunk_length "
                f"({n}/{c.chunk_length}), num_neighbors, num_retrieved_chunks*chunk_length]."
            )

    def forward(
        self,
        tokens: Tensor,
        neighbor_tokens: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        inference_context: Optional[RetroInferenceContext] = None,
    ) -> Tensor:
        """Logits [b, n, vocab (/tp unless gathered)], or per-token loss [b, n] with labels.

        neighbor_tokens None (or retrieval_gate 0) runs the decoder alone. With an
        inference_context (eval mode), `tokens` continue the cached sequence at
        inference_context.sequence_len_offset, neighbours come from the context, and the
        logits are the last position's, [b, 1, vocab]; call inference_context.advance(n) after.
        """
        if inference_context is not None:
            return self._forward_cached(tokens, inference_context, runtime_gather_output)
        self._check(tokens, neighbor_tokens)
        extra = None
        if neighbor_tokens is not None and self.has_retrieval and self.config.retrieval_gate != 0:
            mask = neighbor_mask(neighbor_tokens, self.config.neighbor_pad_id)
            b, l, k, r = neighbor_tokens.shape
            ids = neighbor_tokens.clamp(min=0).reshape(b * l * k, r)
            context = self.embedding(input_ids=ids, position_ids=self._positions(ids))  # [r, b*l*k, h]
            extra = {"context": context, "context_mask": mask}
        return super().forward(
            input_ids=tokens,
            position_ids=self._positions(tokens),
            attention_mask=None,
            labels=labels,
            extra_block_kwargs=extra,
            runtime_gather_output=runtime_gather_output,
        )

    def _positions(self, ids: Tensor) -> Optional[Tensor]:
        """Position ids 0..n-1 for each row of ids [b, n] under learned absolute positions (a
        neighbour's tokens are 0..r-1, as both upstreams number them); None under RoPE."""
        if self.position_embedding_type != "learned_absolute":
            return None
        b, n = ids.shape
        return torch.arange(n, device=ids.device).expand(b, n)

    def _forward_cached(self, tokens: Tensor, ctx: RetroInferenceContext, gather: Optional[bool]) -> Tensor:
        if self.training:
            raise UserError("generation with a KV cache needs model.eval() (dropout off).")
        b, n = tokens.shape
        start = ctx.sequence_len_offset
        if start + n > ctx.max_sequence_length:
            raise UserError(f"the sequence grows to {start + n} tokens but the inference context holds "
                            f"{ctx.max_sequence_length}; make it larger.")
        if start > 0 and n > 1:
            # megatron-core's static cache drops the causal mask once the offset is past 0.
            raise UserError(f"after the first piece, feed one token at a time (got {n} tokens at offset {start}).")
        ctx.new_neighbors = {}
        if self.has_retrieval and self.config.retrieval_gate != 0:
            for i in completed_chunks(start, n, ctx.chunk_length):
                nb = ctx.neighbor_tokens[:b, i]  # [b, k, r]
                mask = neighbor_mask(nb, self.config.neighbor_pad_id)
                k, r = nb.shape[1:]
                ids = nb.clamp(min=0).reshape(b * k, r)
                emb = self.embedding(input_ids=ids, position_ids=self._positions(ids))
                ctx.new_neighbors[i] = (emb, mask[:, None])
        positions = torch.arange(start, start + n, device=tokens.device).expand(b, n)
        return super().forward(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=None,
            inference_context=ctx,
            runtime_gather_output=True if gather is None else gather,
        )


class GPTTwinModel(RetroModel):
    """The same decoder without chunked cross-attention (and without the encoder)."""

    def __init__(self, config: RetroConfig, *args, **kwargs):
        super().__init__(gpt_twin_config(config), *args, **kwargs)

    def forward(self, tokens: Tensor, neighbor_tokens: Optional[Tensor] = None, **kwargs) -> Tensor:
        return super().forward(tokens, None, **kwargs)


def gpt_twin_config(config: RetroConfig) -> RetroConfig:
    return dataclasses.replace(copy.copy(config), cca_layers=[])


def build_model(config: RetroConfig, args: ModelArgs, parallel_output: bool = True) -> RetroModel:
    """The model a recipe's `model` section describes (args.arch: "retro" or "gpt")."""
    cls = RetroModel if args.arch == "retro" else GPTTwinModel
    model = cls(
        config,
        args.vocab_size,
        args.max_sequence_length,
        share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
        parallel_output=parallel_output,
    )
    if not config.perform_initialization:
        mark_tensor_parallel_weights(model)
    return model


def parameter_counts(config: RetroConfig, args: ModelArgs, detail: bool = False) -> dict[str, int]:
    """Parameters per part, built on the meta device (no memory, no weights initialised).

    Parts: embedding, output_layer, decoder (GPT part of every layer + final norm),
    cca (pre-CCA norms + chunked cross-attention), encoder, total. With `detail`, decoder
    is split further into decoder_attention (input norm + self-attention), decoder_mlp
    (pre-MLP norm + MLP) and final_norm, which sum to decoder. Outside a parallel job
    this sets up a world of one; inside one it counts this rank's tensor-parallel shard.
    """
    from megatron.core import parallel_state

    from retro_toolkit.collections.retro.parallel import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = dataclasses.replace(config, tensor_model_parallel_size=tp, perform_initialization=False)
    with torch.device("meta"):
        model = build_model(cfg, args)
    counts = {"embedding": 0, "output_layer": 0, "decoder": 0, "cca": 0, "encoder": 0}
    fine = {"decoder_attention": 0, "decoder_mlp": 0, "final_norm": 0}
    for name, p in model.named_parameters():
        if name.startswith("embedding."):
            part = "embedding"
        elif name.startswith("output_layer."):
            part = "output_layer"
        elif ".cross_attention.encoder." in name:
            part = "encoder"
        elif ".cross_attention." in name or ".pre_cross_attn_layernorm." in name:
            part = "cca"
        else:
            part = "decoder"
            if ".self_attention." in name or ".input_layernorm." in name:
                fine["decoder_attention"] += p.numel()
            elif ".mlp." in name or ".pre_mlp_layernorm." in name:
                fine["decoder_mlp"] += p.numel()
            else:
                fine["final_norm"] += p.numel()
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    if detail:
        counts.update(fine)
    return counts
