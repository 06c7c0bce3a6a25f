"""Stage `tokenizer`: train the decoder's SentencePiece model on the corpus, or copy a given one."""

from __future__ import annotations

import shutil

from retro_toolkit.collections.text.sources import check_source, iter_documents
from retro_toolkit.collections.text.tokenizer import Tokenizer, train_sentencepiece
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext, StageResult

MODEL_FILE = "tokenizer/tokenizer.model"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.tokenizer
    out = ctx.workdir / MODEL_FILE
    if ctx.env.is_main:  # tokenizer training is single-process; other ranks wait
        if cfg.model:
            ctx.log(f"using the given SentencePiece model {cfg.model}")
            Tokenizer(cfg.model)  # fails clearly on a bad file before we copy it
            with files.atomic_path(out) as tmp:
                shutil.copyfile(cfg.model, tmp)
        else:
            for i, src in enumerate(ctx.recipe.data.sources):
                check_source(src, f"data.sources[{i}]")
            ctx.log(f"training SentencePiece ({cfg.model_type}, vocab {cfg.vocab_size}) on the corpus")
            progress = ctx.progress("read", None, "docs")

            def texts():
                for text, _ in iter_documents(ctx.recipe.data.sources, ctx.recipe.data.on_invalid_utf8):
                    progress.update(1)
                    yield text

            with files.atomic_path(out) as tmp:
                train_sentencepiece(
                    texts(),
                    tmp,
                    vocab_size=cfg.vocab_size,
                    model_type=cfg.model_type,
                    character_coverage=cfg.character_coverage,
                    max_lines=cfg.train_max_lines,
                    byte_fallback=cfg.byte_fallback,
                    seed=ctx.recipe.seed,
                )
            progress.close()
    dist.barrier()
    tok = Tokenizer(out)
    ctx.log(f"vocab {tok.vocab_size}, special ids {tok.special_ids()}")
    return StageResult(
        outputs=[MODEL_FILE],
        summary={"vocab_size": tok.vocab_size, **{f"{k}_id": v for k, v in tok.special_ids().items()}},
    )
