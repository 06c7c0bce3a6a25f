"""Stage `eval_ppl`: validation/test perplexity, with and without retrieval."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.fields import WHY_BATCH, WHY_COUNT, bounded
from retro_toolkit.stages.build_db import Split
from retro_toolkit.stages.spec import StageSpec


@dataclass
class EvalPplConfig:
    # Splits to evaluate (each needs neighbours from build_db for Retro).
    splits: list[Split] = field(default_factory=lambda: ["valid", "test"])
    # Samples per split (windows of model.seq_length tokens, in stream order); null = all.
    max_samples: Optional[int] = bounded(None, 1, 10**12, WHY_COUNT)
    micro_batch_size: int = bounded(4, 1, 2**20, WHY_BATCH)


def check(r: dict[str, Any]) -> None:
    if not r["eval_ppl"]["splits"]:
        raise UserError("recipe key 'eval_ppl.splits' is empty: list at least one split, e.g. [valid].")


STAGE = StageSpec("eval_ppl", "eval_ppl", depends_on=("pretrain",), config_keys=("eval_ppl",),
                  entry="retro_toolkit.collections.retro.eval_ppl:run", reads_database=True, summary=__doc__, check=check)
