"""Stage `pretrain`: pretrain Retro (or its GPT twin); checkpoints, exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe import model
from retro_toolkit.recipe.checker import check_exists
from retro_toolkit.recipe.fields import filepath
from retro_toolkit.stages import training
from retro_toolkit.stages.spec import StageSpec
from retro_toolkit.stages.training import TrainingConfig, check_training

# The GPT twin's checkpoints/<name> (pretrain.gpt_twin).
TWIN = "pretrain_gpt_twin"
# Keys added after checkpoints existed, at the value that reproduces the old behaviour.
ADDED_KEYS: tuple[tuple[str, object], ...] = (("retrieval_lr_mult", 1.0), *training.ADDED_KEYS)
RESUME_FREE = training.RESUME_FREE | {"gpt_twin"}


@dataclass
class PretrainConfig(TrainingConfig):
    # Sampling weight of each data.sources entry in training batches (same order, any
    # positive scale); null = every window of the train stream equally (size-proportional).
    source_weights: Optional[list[float]] = None
    # Start from a GPT: this toolkit's checkpoints/<stage> or iter_NNNNNNN folder, a .nemo
    # package, a Hugging Face Llama/Mistral/Qwen2 folder, or a Megatron-LM GPT checkpoint
    # folder. Loads the decoder; chunked cross-attention and the encoder start fresh.
    init_from: Optional[str] = filepath(None)
    # Retro-fitting: train only chunked cross-attention and the encoder.
    freeze_decoder: bool = False
    # Learning rate (and min_lr) of chunked cross-attention and the encoder, as a multiple of
    # lr: new parameters next to a trained decoder, or a retrieval path that learns slowly.
    retrieval_lr_mult: float = 1.0
    # Also train the GPT twin (same decoder without retrieval, same data and steps) into
    # checkpoints/pretrain_gpt_twin/, so eval_ppl compares the two.
    gpt_twin: bool = False


def check(r: dict[str, Any]) -> None:
    p, m = r["pretrain"], r["model"]
    check_training(p, "pretrain")
    for key in ("freeze_decoder", "gpt_twin"):
        if p[key] and m["arch"] != "retro":
            raise UserError(f"pretrain.{key} needs model.arch retro (it is '{m['arch']}').")
    if p["retrieval_lr_mult"] <= 0:
        raise UserError(f"recipe key 'pretrain.retrieval_lr_mult' must be positive (got {p['retrieval_lr_mult']}).")
    if p["retrieval_lr_mult"] != 1.0 and m["arch"] != "retro":
        raise UserError(f"pretrain.retrieval_lr_mult needs model.arch retro (it is '{m['arch']}').")
    if p["freeze_decoder"] and not p["init_from"]:
        raise UserError(
            "pretrain.freeze_decoder trains only chunked cross-attention and the encoder, so the decoder "
            "must come from somewhere: set pretrain.init_from to a GPT checkpoint."
        )
    check_exists(p["init_from"], "pretrain.init_from",
                 ". Give a GPT: a checkpoints/<stage> folder (with its 'latest' file) or one iter_NNNNNNN folder, a "
                 ".nemo package, a Hugging Face folder or a Megatron-LM checkpoint folder.")
    w = p["source_weights"]
    if w is not None:
        n = len(r["data"]["sources"])
        if len(w) != n or any(x < 0 for x in w) or not sum(w) > 0:
            raise UserError(
                f"pretrain.source_weights = {w} must give one non-negative weight per data.sources entry "
                f"({n}), not all zero; or null to sample the train stream uniformly."
            )


STAGE = StageSpec("pretrain", "pretrain", depends_on=("build_db",), gpt_depends_on=("prepare_corpus",),
                  config_keys=("model", "pretrain", "seed"), entry="retro_toolkit.collections.retro.pretrain:run",
                  summary=__doc__, added_keys=model.added_keys() + tuple((f"pretrain.{k}", v) for k, v in ADDED_KEYS),
                  check=check, reads=lambda r: [("pretrain.init_from", r.pretrain.init_from)])
