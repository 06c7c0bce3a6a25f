"""Stage `tokenizer`: train the decoder's SentencePiece model on the corpus, or take a given
SentencePiece model or Hugging Face tokenizer; either way it lands in <workdir>/tokenizer/."""

from __future__ import annotations

import tempfile
from pathlib import Path

from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
from retro_toolkit.collections.text.corpus_layout import iter_documents
from retro_toolkit.collections.text.sources import check_source
from retro_toolkit.collections.text.tokenizer import TOKENIZER_DIR, open_tokenizer, workdir_tokenizer, write_tokenizer
from retro_toolkit.core import dist
from retro_toolkit.core.stage import StageContext, StageResult


def _train(ctx: StageContext) -> SentencePieceTokenizer:
    cfg = ctx.recipe.tokenizer
    for i, src in enumerate(ctx.recipe.data.sources):
        check_source(src, f"data.sources[{i}]")
    ctx.log(f"training SentencePiece ({cfg.model_type}, vocab {cfg.vocab_size}) on the corpus")
    progress = ctx.progress("read", None, "docs")

    def texts():
        for text, _ in iter_documents(ctx.recipe.data.sources, ctx.recipe.data.on_invalid_utf8):
            progress.update(1)
            yield text

    with tempfile.TemporaryDirectory(prefix="spm_", dir=ctx.workdir) as tmp:
        model = Path(tmp) / "tokenizer.model"
        train_sentencepiece(texts(), model, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                            character_coverage=cfg.character_coverage, max_lines=cfg.train_max_lines,
                            byte_fallback=cfg.byte_fallback, seed=ctx.recipe.seed)
        progress.close()
        return SentencePieceTokenizer(model)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.tokenizer
    if ctx.env.is_main:  # tokenizer training is single-process; other ranks wait
        if cfg.model:
            tok = open_tokenizer(cfg.model)  # fails clearly on a bad file before anything is written
            what = "SentencePiece model" if tok.kind == "sentencepiece" else "Hugging Face tokenizer"
            ctx.log(f"using the given {what} {cfg.model}")
        else:
            tok = _train(ctx)
        write_tokenizer(tok, ctx.workdir / TOKENIZER_DIR)
    dist.barrier()
    tok = workdir_tokenizer(ctx.workdir)
    ctx.log(f"{tok.kind} tokenizer, vocab {tok.vocab_size}, special ids {tok.special_ids()}")
    return StageResult(
        outputs=[f"{TOKENIZER_DIR}/{name}" for name in sorted(tok.files())],
        summary={"kind": tok.kind, "vocab_size": tok.vocab_size,
                 **{f"{k}_id": v for k, v in tok.special_ids().items()}},
    )
