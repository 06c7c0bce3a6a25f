"""Where a chunk's neighbours come from while generating.

A source is asked once per completed chunk, for the whole batch, with the chunk's tokens,
and answers neighbour tokens [b, k, r] (-1 = masked):

  FixedNeighbors   the same neighbours for every chunk of a row (a QA task's contexts,
                   as InstructRetro evaluates: top-1 in the prompt, the rest here)
  LiveRetrieval    the work directory's faiss index, queried with the chunk's text
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from retro_toolkit.errors import UserError


class NeighborSource(Protocol):
    def chunk_neighbors(self, chunk_index: int, chunk_tokens: np.ndarray) -> Tensor:
        """chunk_tokens [b, m] -> neighbour tokens [b, k, r]."""
        ...


def fit_neighbor(tokens: Sequence[int], length: int, pad_id: int) -> list[int]:
    """A neighbour's tokens cut or padded (pad_id, masked by the model) to `length`."""
    tokens = list(tokens)[:length]
    return tokens + [pad_id] * (length - len(tokens))


class FixedNeighbors:
    def __init__(self, rows: Sequence[Sequence[Sequence[int]]], k: int, r: int, pad_id: int) -> None:
        """rows[b] = that row's neighbours as token lists (at most k; missing ones are masked)."""
        out = torch.full((len(rows), k, r), -1, dtype=torch.long)
        for b, neighbours in enumerate(rows):
            for j, toks in enumerate(list(neighbours)[:k]):
                out[b, j] = torch.tensor(fit_neighbor(toks, r, pad_id), dtype=torch.long)
        self.tokens = out
        self.calls = 0

    @classmethod
    def from_tensor(cls, tokens: Tensor | np.ndarray) -> "FixedNeighbors":
        """From neighbour tokens [b, k, r] as they are (-1 = masked)."""
        self = cls.__new__(cls)
        self.tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        self.calls = 0
        return self

    def chunk_neighbors(self, chunk_index: int, chunk_tokens: np.ndarray) -> Tensor:
        self.calls += 1
        if chunk_tokens.shape[0] != self.tokens.shape[0]:
            raise UserError(f"FixedNeighbors holds {self.tokens.shape[0]} rows, the batch has {chunk_tokens.shape[0]}.")
        return self.tokens


class LiveRetrieval:
    """Queries a Retriever with each completed chunk's text (as build_db queried the corpus)."""

    def __init__(self, retriever, k: int) -> None:
        self.retriever = retriever
        self.k = k
        self.queries = 0  # chunks looked up
        self.log: list[tuple[int, np.ndarray]] = []  # (chunk index, neighbour chunk ids [b, k])

    def chunk_neighbors(self, chunk_index: int, chunk_tokens: np.ndarray) -> Tensor:
        hits = self.retriever.search(list(chunk_tokens), k=self.k)
        self.queries += len(chunk_tokens)
        self.log.append((chunk_index, hits.ids))
        return torch.from_numpy(hits.tokens.astype(np.int64))
