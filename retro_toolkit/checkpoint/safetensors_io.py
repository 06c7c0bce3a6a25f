"""Weights for other inference engines: a folder of safetensors, JSON config and tokenizer.

    <out>/model.safetensors   every tensor, unsharded (tensor-parallel size 1), named as in
                              retro_toolkit's model (megatron-core local-spec names)
    <out>/config.json         the model section, tokenizer and retrieval settings
    <out>/tokenizer.model     the decoder's SentencePiece model (or tokenizer.json + tokenizer_config.json)

    export_safetensors("export/smoke.nemo", "export/smoke.safetensors")
    pkg = load_safetensors("export/smoke.safetensors")       # back into a model
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from retro_toolkit.checkpoint import nemo
from retro_toolkit.checkpoint.mapped import SafetensorsWeights
from retro_toolkit.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "retro_toolkit.safetensors.v1"


def export_safetensors(package: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a .nemo package's model as safetensors + config.json + its tokenizer's files (atomically)."""
    from safetensors.torch import save_file

    pkg = nemo.restore(package, tensor_model_parallel_size=1, device="cpu")
    out = Path(out)
    state = nemo.full_state(pkg.model)
    cfg = {"format": FORMAT, "model": pkg.section, "weights": WEIGHTS, "tokenizer": nemo.tokenizer_entry(pkg.tokenizer)["model"].removeprefix(nemo.NEMO_PREFIX),
           "tokenizer_sha256": pkg.config["tokenizer"]["sha256"], "retrieval": pkg.retrieval,
           "parameters": {k: list(v.shape) for k, v in state.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "source": str(package)})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        for name, data in pkg.tokenizer.files().items():
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_safetensors(folder: str | os.PathLike, tensor_model_parallel_size: Optional[int] = None,
                     device: Optional[str] = None, dtype: Any = None) -> nemo.Package:
    """The model of an export_safetensors folder, ready for generation (built in `dtype`, default
    as saved, on `device`, then filled one tensor at a time)."""
    from safetensors import safe_open

    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    folder = Path(folder)
    cfg_file = folder / CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{folder} has no {CONFIG}: give a folder written by retro-run export-safetensors.")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_file}: format is {cfg.get('format')!r}, expected {FORMAT!r}.")
    tokenizer = open_tokenizer(folder / cfg["tokenizer"], f"{cfg_file}: tokenizer")
    with safe_open(str(folder / cfg["weights"]), framework="pt") as f:
        weights = SafetensorsWeights(f)  # read one tensor at a time, as load_full asks
        model = nemo.build_for(cfg["model"], tokenizer, tensor_model_parallel_size, dtype or weights.dtype(), device)
        nemo.load_full(model, weights, folder / cfg["weights"])
    return nemo.Package(model.eval(), tokenizer, cfg, cfg.get("retrieval"), folder, cfg["model"])

