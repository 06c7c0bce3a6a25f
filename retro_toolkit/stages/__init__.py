"""The pipeline's stages, in order: each leaf owns its recipe section, its checks and its entry.

Nothing here imports torch: the runner plans and validates a recipe from these alone, and
each stage's code is imported only inside its job (`StageSpec.entry`).
"""

from retro_toolkit.stages import build_db, eval_ppl, eval_qa, export, prepare_corpus, pretrain, sft, tokenizer
from retro_toolkit.stages.spec import StageSpec

STAGES: dict[str, StageSpec] = {
    m.STAGE.name: m.STAGE for m in (tokenizer, prepare_corpus, build_db, pretrain, eval_ppl, sft, eval_qa, export)
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)

__all__ = ["STAGES", "STAGE_NAMES", "StageSpec"]
