"""The recipe schema: the top-level keys, and a section per stage composed from the stages.

Each section's dataclass lives with its stage (retro_toolkit/stages/), the model's in
recipe/model.py. Every field's comment is what `retro-run show` users read to learn a key,
so keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from retro_toolkit.recipe.fields import INT32, WHY_SEED, bounded, filepath
from retro_toolkit.recipe.model import ModelConfig
from retro_toolkit.stages import STAGE_NAMES
from retro_toolkit.stages.build_db import RetrievalConfig
from retro_toolkit.stages.eval_ppl import EvalPplConfig
from retro_toolkit.stages.eval_qa import EvalQaConfig
from retro_toolkit.stages.export import ExportConfig
from retro_toolkit.stages.prepare_corpus import DataConfig
from retro_toolkit.stages.pretrain import PretrainConfig
from retro_toolkit.stages.sft import SftConfig
from retro_toolkit.stages.tokenizer import TokenizerConfig


@dataclass
class Recipe:
    name: str = "???"
    description: str = ""
    # Work directory owned by this recipe; every stage reads and writes only there.
    workdir: str = filepath("./runs/${name}")
    # Named folders for the other keys to interpolate, e.g. paths: {data: /lustre/retro} and
    # tokenizer.model: ${paths.data}/tokenizer.model (the full-size recipes set one data root).
    paths: dict[str, str] = field(default_factory=dict)
    seed: int = bounded(1234, 0, INT32, WHY_SEED)
    # Stages this recipe runs, in any order (the runner orders them by dependency).
    stages: list[Literal[STAGE_NAMES]] = "???"  # type: ignore[assignment]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval_ppl: EvalPplConfig = field(default_factory=EvalPplConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval_qa: EvalQaConfig = field(default_factory=EvalQaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Checked against the executor schema chosen by executor.type (retro_toolkit/executors/).
    executor: Any = field(default_factory=lambda: {"type": "local"})
