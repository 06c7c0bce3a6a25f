"""Stage `export`: package the trained model as export/<name>.nemo (and safetensors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe import model
from retro_toolkit.recipe.checker import check_exists
from retro_toolkit.recipe.fields import filepath
from retro_toolkit.stages.spec import StageSpec


@dataclass
class ExportConfig:
    # Which weights: "auto" (sft when the recipe runs it, else pretrain), "sft", "pretrain",
    # or a checkpoint folder.
    checkpoint: str = filepath("auto", words=("auto", "sft", "pretrain"))
    # The package is export/<name>.nemo; null = the recipe's name.
    name: Optional[str] = None
    # "file": model_weights.ckpt, one unsharded state dict; "dist": model_weights/, a
    # megatron-core dist checkpoint (for models too large for one torch.save).
    weights: Literal["file", "dist"] = "file"
    # Also write export/<name>.safetensors/ (safetensors + config.json + the tokenizer's files).
    safetensors: bool = False


def check(r: dict[str, Any]) -> None:
    e = r["export"]
    if e["name"] is not None and (not e["name"] or "/" in e["name"] or e["name"].startswith(".")):
        raise UserError(f"recipe key 'export.name' ({e['name']!r}) must be a plain file name (no '/', not hidden).")
    if e["checkpoint"] == "sft" and "sft" not in r["stages"]:
        raise UserError("recipe key 'export.checkpoint' is sft but the recipe does not run the sft stage: "
                        "use auto or pretrain, or add sft to 'stages'.")
    check_exists(e["checkpoint"], "export.checkpoint", "; use auto, sft, pretrain or a checkpoint folder.")


STAGE = StageSpec("export", "export", depends_on=("pretrain",), after=("sft",),
                  config_keys=("model", "export"), entry="retro_toolkit.checkpoint.export:run", summary=__doc__,
                  added_keys=model.added_keys(), check=check, gated=True, reads_database=True,
                  reads=lambda r: [("export.checkpoint", r.export.checkpoint)] if os.path.isabs(r.export.checkpoint) else [])
