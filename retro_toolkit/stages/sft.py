"""Stage `sft`: instruction tuning (InstructRetro): answer-only loss, checkpoints, exact resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from retro_toolkit.collections.instruct.readers import FORMATS
from retro_toolkit.errors import UserError
from retro_toolkit.recipe import model
from retro_toolkit.recipe.checker import check_data_file, check_exists
from retro_toolkit.recipe.fields import WHY_SHAPE, bounded, filepath, redefault
from retro_toolkit.stages import training
from retro_toolkit.stages.spec import StageSpec
from retro_toolkit.stages.training import DecayStyle, TrainingConfig, check_training

ADDED_KEYS = training.ADDED_KEYS
RESUME_FREE = training.RESUME_FREE


@dataclass
class InstructDatasetConfig:
    # Name in logs (e.g. dolly, oasst).
    name: str = "???"
    # The data file, or builtin:smoke-instruct / builtin:smoke-qa (this project's small sets
    # about the smoke corpus).
    path: str = filepath("???")
    # conversation ({"messages": [{"role", "content"}...]} per line), qa (InstructRetro's
    # {"question", "answers", "ctxs"}) or prompt_response ({"prompt", "response"} per line).
    format: Literal[FORMATS] = "conversation"
    # Share of the training samples (any positive scale; 0 = left out).
    weight: float = 1.0


@dataclass
class SftConfig(TrainingConfig):
    # The instruction blend (yaml/sft/open_inst.yaml lists InstructRetro's open blend).
    datasets: list[InstructDatasetConfig] = field(default_factory=list)
    # Weights to start from: a checkpoints/<stage> or iter_NNNNNNN folder; null = this work
    # directory's checkpoints/pretrain.
    init_from: Optional[str] = filepath(None)
    # Tokens per sample (a multiple of model.chunk_length); null = model.seq_length. Longer
    # conversations are cut at the end.
    seq_length: Optional[int] = bounded(None, 1, 2**20, WHY_SHAPE)
    # Keep retrieval on while tuning: neighbours are each QA record's contexts after the
    # first (top-1 goes in the prompt). false = retrieval gate 0 with chunked cross-attention
    # and the encoder frozen, as InstructRetro tunes.
    retrieval: bool = False
    # The System line of every prompt; null = the toolkit's default.
    system_prompt: Optional[str] = None
    # InstructRetro's settings: lr 5e-6 constant, batch 128, 1000 iterations, wd 0.01, Adam 0.9/0.98.
    train_iters: int = redefault(TrainingConfig, "train_iters", 1000)
    global_batch_size: int = redefault(TrainingConfig, "global_batch_size", 128)
    lr: float = 5.0e-6
    min_lr: float = 5.0e-6
    lr_decay_style: DecayStyle = "constant"
    weight_decay: float = 0.01
    adam_beta2: float = 0.98


def check(r: dict[str, Any]) -> None:
    s, m = r["sft"], r["model"]
    check_training(s, "sft")
    if not s["datasets"]:
        raise UserError("recipe key 'sft.datasets' is empty: list at least one {name, path, format, weight}.")
    for i, d in enumerate(s["datasets"]):
        if d["weight"] < 0:
            raise UserError(f"recipe key 'sft.datasets[{i}].weight' must not be negative (got {d['weight']}).")
        check_data_file(d["path"], f"sft.datasets[{i}].path")
    if not sum(d["weight"] for d in s["datasets"]) > 0:
        raise UserError("the weights of sft.datasets sum to 0: give at least one dataset a positive weight.")
    if s["seq_length"] is not None and s["seq_length"] % m["chunk_length"]:
        raise UserError(f"recipe key 'sft.seq_length' ({s['seq_length']}) must be a positive multiple of "
                        f"model.chunk_length ({m['chunk_length']}).")
    check_exists(s["init_from"], "sft.init_from", ".")


STAGE = StageSpec("sft", "sft", depends_on=("pretrain",), config_keys=("model", "sft", "seed"),
                  entry="retro_toolkit.collections.instruct.sft:run", summary=__doc__,
                  added_keys=model.added_keys() + tuple((f"sft.{k}", v) for k, v in ADDED_KEYS), check=check, gated=True,
                  reads=lambda r: [("sft.init_from", r.sft.init_from),
                                   *((f"sft.datasets[{i}].path", d.path) for i, d in enumerate(r.sft.datasets))])
