"""Text generation from Retro (or its GPT twin): KV cache, sampling, retrieval while decoding.

    from retro_toolkit.collections.generate import SamplingParams, generate_text, FixedNeighbors
    outs = generate_text(model, tokenizer, ["Question: ..."], SamplingParams(max_new_tokens=32))
    outs[0].text, outs[0].finish_reason
"""

from retro_toolkit.collections.generate.generator import Generation, generate_ids, generate_text
from retro_toolkit.collections.generate.neighbors import FixedNeighbors, LiveRetrieval, NeighborSource
from retro_toolkit.collections.generate import packed
from retro_toolkit.collections.generate.sampling import SamplingParams, sample

__all__ = [
    "FixedNeighbors",
    "Generation",
    "LiveRetrieval",
    "NeighborSource",
    "SamplingParams",
    "generate_ids",
    "generate_text",
    "packed",
    "sample",
]
