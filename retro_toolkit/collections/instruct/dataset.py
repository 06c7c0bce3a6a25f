"""Instruction-tuning samples: formatted conversations, answer-only loss, optional neighbours.

Sample i is blend[i]'s conversation rendered by format.py, cut or padded (pad id, loss
mask 0) to seq_length + 1 tokens: tokens = ids[:-1], labels = ids[1:], loss_mask[t] = 1
where labels[t] is an answer token. With retrieval, every chunk's neighbours are the
record's contexts after the first (the first is in the prompt), each cut or padded to r
tokens; missing ones are -1 (masked).
"""

from __future__ import annotations

import numpy as np

from retro_toolkit.collections.generate.neighbors import fit_neighbor
from retro_toolkit.collections.instruct.blend import InstructBlend
from retro_toolkit.collections.instruct.format import Context, Conversation, encode_conversation


def context_neighbors(contexts: list[Context], tokenizer, k: int, r: int) -> np.ndarray:
    """[k, r] neighbour tokens from the first k of `contexts`, rendered (-1 rows where missing)."""
    out = np.full((k, r), -1, dtype=np.int64)
    for j, c in enumerate(contexts[:k]):
        out[j] = fit_neighbor(tokenizer.encode([c.render()])[0], r, tokenizer.pad_id)
    return out


class SftDataset:
    def __init__(self, datasets: list[list[Conversation]], blend: InstructBlend, tokenizer, seq_length: int,
                 chunk_length: int, num_neighbors: int, retrieved_length: int, retrieval: bool, system: str):
        self.datasets, self.blend, self.tokenizer = datasets, blend, tokenizer
        self.n, self.m, self.k, self.r = seq_length, chunk_length, num_neighbors, retrieved_length
        self.retrieval, self.system = retrieval, system

    def __len__(self) -> int:
        return len(self.blend)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, j = self.blend[i]
        conv = self.datasets[d][j]
        ids, mask = encode_conversation(conv, self.tokenizer, self.system)
        ids, mask = ids[: self.n + 1], mask[: self.n + 1]
        pad = self.n + 1 - len(ids)
        ids = np.array(ids + [self.tokenizer.pad_id] * pad, dtype=np.int64)
        mask = np.array(mask + [0] * pad, dtype=np.float32)
        out = {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": mask[1:]}
        if self.retrieval:
            nb = context_neighbors(conv.contexts[1:], self.tokenizer, self.k, self.r)  # top-1 is in the prompt
            out["neighbor_tokens"] = np.broadcast_to(nb, (self.n // self.m, self.k, self.r)).copy()
        return out
