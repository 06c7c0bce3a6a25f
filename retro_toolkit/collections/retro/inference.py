"""Incremental decoding state: megatron-core's static KV cache plus Retro's chunk state.

Generation feeds a sequence in pieces (the prompt, then one token at a time). The decoder's
self-attention keeps keys and values in megatron-core's StaticInferenceContext; chunked
cross-attention needs three more things between pieces, kept here:

  neighbor_tokens [b, chunks, k, r]   each chunk's neighbours, -1 = masked; the caller
                                      fills chunk i before the piece that completes it
  cca_inputs      [max_len, b, h]     the first CCA layer's inputs so far (the encoder
                                      cross-attends to a completed chunk's m positions)
  encoded         {chunk: [k*r, b, h]} encoded neighbours, computed once per chunk
  cca_kv          each CCA layer's key/value projection of them, also once per chunk

Positions [(i+1)m - 1, (i+2)m - 2] read chunk i's encoded neighbours, as in the full
forward pass, so a cached run gives the full pass's logits (to float rounding).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor


def neighbor_mask(neighbor_tokens: Tensor, pad_id: Optional[int]) -> Tensor:
    """True where a neighbour token is missing (-1) or document-end padding (pad_id)."""
    mask = neighbor_tokens < 0
    if pad_id is not None:
        mask |= neighbor_tokens == pad_id
    return mask


def completed_chunks(start: int, length: int, chunk_length: int) -> range:
    """Chunks whose last position, (i+1)m - 1, lies in [start, start + length)."""
    m = chunk_length
    return range(-(-(start + 1) // m) - 1, (start + length) // m)


class RetroInferenceContext(StaticInferenceContext):
    def __init__(self, batch_size: int, max_sequence_length: int, chunk_length: int, num_neighbors: int,
                 retrieved_length: int, device: Optional[torch.device] = None):
        super().__init__(batch_size, max_sequence_length)
        self.chunk_length = chunk_length
        chunks = -(-max_sequence_length // chunk_length)
        self.neighbor_tokens = torch.full((batch_size, chunks, num_neighbors, retrieved_length), -1,
                                          dtype=torch.long, device=device)
        self.cca_inputs: Optional[Tensor] = None
        self.encoded: dict[int, Tensor] = {}
        # (CCA layer, chunk) -> that layer's key/value projection of the chunk's encoded neighbours.
        self.cca_kv: dict[tuple[int, int], dict] = {}
        # Set by RetroModel.forward for the CCA layers: chunk -> (embeddings [r, b*k, h], mask [b, 1, k, r]).
        self.new_neighbors: dict[int, tuple[Tensor, Tensor]] = {}

    def advance(self, length: int) -> None:
        """Call after each forward piece of `length` tokens."""
        self.sequence_len_offset += length
        self.new_neighbors = {}
        current = (self.sequence_len_offset + 1) // self.chunk_length - 1
        for i in [i for i in self.encoded if i < current]:
            del self.encoded[i]
        for key in [key for key in self.cca_kv if key[1] < current]:
            del self.cca_kv[key]

    def reset(self) -> None:
        super().reset()
        self.key_value_memory_dict.clear()
        self.neighbor_tokens.fill_(-1)
        self.cca_inputs = None
        self.encoded.clear()
        self.cca_kv.clear()
        self.new_neighbors = {}
