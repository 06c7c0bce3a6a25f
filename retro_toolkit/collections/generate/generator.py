"""The generation loop: batched, KV-cached, with retrieval at chunk boundaries.

Rows keep their own positions (no padding in front), so chunk i of every row ends at
position (i+1)m - 1 and Retro's chunk alignment holds for the whole batch. The prompts'
common prefix is fed in one piece; after that one token per step, where a row still
inside its prompt takes its prompt token instead of the sampled one. Before the piece
that completes chunk i the neighbour source is asked for chunk i's neighbours.

`use_cache=False` recomputes the whole prefix for every token (what upstream did); it is
the reference the cached path must match and the baseline of benchmarks/speed/generate.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from retro_toolkit.collections.generate.neighbors import NeighborSource
from retro_toolkit.collections.generate.packed import packed_linears
from retro_toolkit.collections.generate.sampling import SamplingParams, sample
from retro_toolkit.collections.retro.inference import RetroInferenceContext, completed_chunks
from retro_toolkit.errors import UserError


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the end-of-document token
    finish_reason: str  # "eos", "stop", "length" or "cancelled"
    text: str = ""


def _model_dims(model) -> tuple[int, int, int]:
    c = model.config
    return c.chunk_length, c.num_neighbors, c.retrieved_length


@torch.no_grad()
def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    neighbors: Optional[NeighborSource] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    stop_check: Optional[Callable[[list[int]], bool]] = None,
    use_cache: bool = True,
    on_token: Optional[Callable[[int, int], None]] = None,
    cancelled: Optional[Callable[[int], bool]] = None,
) -> list[Generation]:
    """New tokens for each prompt (token ids). stop_check(new_tokens) True ends a row ("stop");
    on_token(row, token) sees each new token as it is chosen; cancelled(row) True ends a row
    ("cancelled") and the whole batch once every row has ended."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token.")
    if model.training:
        raise UserError("call model.eval() before generating (dropout must be off).")
    device = next(model.parameters()).device
    m, k, r = _model_dims(model)
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    total = max(lengths) + params.max_new_tokens
    capacity = -(-total // m) * m
    limit = getattr(model, "max_sequence_length", capacity)
    if model.position_embedding_type == "learned_absolute" and capacity > limit:
        raise UserError(f"prompt + max_new_tokens needs {capacity} positions; the model has {limit}.")
    tokens = torch.full((b, capacity), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    retrieval = neighbors is not None and model.has_retrieval
    ctx = RetroInferenceContext(b, capacity, m, k, r, device=device) if use_cache else None
    neighbor_tokens = (ctx.neighbor_tokens if ctx is not None
                       else torch.full((b, capacity // m, k, r), -1, dtype=torch.long, device=device))
    generator = torch.Generator(device="cpu").manual_seed(params.seed)

    new: list[list[int]] = [[] for _ in range(b)]
    finish: list[Optional[str]] = [None] * b
    start, end = 0, min(lengths)  # the piece [start, end) goes in next; it predicts position `end`
    # Decode steps (b rows each) use MKL's packed GEMM on CPU; see packed.py.
    with packed_linears(model, b) if use_cache else contextlib.nullcontext():
        while True:
            if retrieval:
                for i in completed_chunks(start, end - start, m):
                    chunk = tokens[:, i * m : (i + 1) * m].cpu().numpy()
                    neighbor_tokens[:, i] = neighbors.chunk_neighbors(i, chunk).to(device)
            if ctx is not None:
                logits = model(tokens[:, start:end], inference_context=ctx)[:, -1]
                ctx.advance(end - start)
            else:
                padded = -(-end // m) * m
                nb = neighbor_tokens[:, : padded // m] if retrieval else None
                logits = model(tokens[:, :padded], nb, runtime_gather_output=True)[:, end - 1]
            chosen = sample(logits, params, generator).tolist()
            for row in range(b):
                if finish[row] is None and cancelled is not None and cancelled(row):
                    finish[row] = "cancelled"
                if end < lengths[row] or finish[row] is not None:
                    continue
                tok = chosen[row]
                tokens[row, end] = tok
                if eos_id is not None and tok == eos_id:
                    finish[row] = "eos"
                    continue
                new[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
                if stop_check is not None and stop_check(new[row]):
                    finish[row] = "stop"
                elif len(new[row]) >= params.max_new_tokens:
                    finish[row] = "length"
            if all(f is not None for f in finish) or end + 1 >= capacity:
                break
            start, end = end, end + 1
    return [Generation(t, f or "length") for t, f in zip(new, finish)]


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams,
    neighbors: Optional[NeighborSource] = None,
    use_cache: bool = True,
) -> list[Generation]:
    """generate_ids from texts (or token ids); each text ends before the first stop string."""
    ids = [tokenizer.encode([p])[0] if isinstance(p, str) else list(p) for p in prompts]

    def stop_check(new: list[int]) -> bool:
        return any(s in tokenizer.decode(new) for s in params.stop)

    outs = generate_ids(model, ids, params, neighbors, eos_id=tokenizer.eod_id, pad_id=tokenizer.pad_id,
                        stop_check=stop_check if params.stop else None, use_cache=use_cache)
    for out in outs:
        out.text = before_stop(tokenizer.decode(out.tokens), params.stop)
    return outs


def before_stop(text: str, stops: Sequence[str]) -> str:
    """The text up to the first of the stop strings it holds (all of it when it holds none)."""
    at = [text.index(s) for s in stops if s in text]
    return text[: min(at)] if at else text
