"""Input checks that need the file system, run before anything is written.

Schema checks live in recipe/validate.py; these look at the files the recipe's stages
will read, so `retro-run validate` and a real run fail the same way, up front.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from retro_toolkit.collections.text.sources import check_source
from retro_toolkit.errors import UserError


def check_inputs(recipe: DictConfig) -> None:
    stages = set(recipe.stages)
    reads_corpus = "prepare_corpus" in stages or ("tokenizer" in stages and not recipe.tokenizer.model)
    if reads_corpus:
        if not recipe.data.sources:
            raise UserError("data.sources is empty: name at least one corpus (e.g. data=pydoc, or a .jsonl path).")
        for i, src in enumerate(recipe.data.sources):
            check_source(src, f"data.sources[{i}]")
    if "build_db" in stages:
        from retro_toolkit.collections.retrieval.embedder import resolve_path

        resolve_path(recipe.retrieval.embedder.path)
        for i, src in enumerate(recipe.retrieval.extra_sources):
            check_source(src, f"retrieval.extra_sources[{i}]")
    if "tokenizer" in stages and recipe.tokenizer.model and not Path(recipe.tokenizer.model).is_file():
        raise UserError(
            f"tokenizer.model: SentencePiece model {recipe.tokenizer.model} does not exist. "
            "Fix the path, or set tokenizer.model=null to train one on the corpus."
        )
