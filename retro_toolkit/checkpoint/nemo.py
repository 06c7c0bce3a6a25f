"""The .nemo package: a model, its tokenizer and its retrieval settings in one file.

    ./model_config.yaml     the model section (plain OmegaConf YAML), `weights`, and
                            artifacts referenced as nemo:<file>
    ./model_weights.ckpt    one unsharded state dict (torch.save, loads with weights_only)
    ./model_weights/        or: a megatron-core dist checkpoint (for models too large for one file)
    ./tokenizer.model       the decoder's SentencePiece model      (tokenizer: {library: sentencepiece,
                                                                    model: nemo:tokenizer.model})
    ./tokenizer.json        or its Hugging Face tokenizer          (tokenizer: {library: huggingface,
      tokenizer_config.json                                         model: nemo:tokenizer.json,
                                                                    config: nemo:tokenizer_config.json})
    ./retrieval.yaml        embedder, index string, chunk length, k (retrieval: nemo:retrieval.yaml)

    export.write_model(model, section, tokenizer, "export/smoke.nemo", retrieval)
    pkg = restore("export/smoke.nemo")                 # any tensor-parallel size, CPU or GPU
    pkg.model(tokens, neighbor_tokens)

Weights are written at tensor-parallel size 1 (the single file holds full tensors; a dist
checkpoint reshards on load), so a package restores at any tensor-parallel size.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from retro_toolkit.checkpoint import archive
from retro_toolkit.errors import UserError

MODEL_CONFIG = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
WEIGHTS_DIR = "model_weights"
RETRIEVAL_FILE = "retrieval.yaml"
NEMO_PREFIX = "nemo:"
FORMAT_VERSION = 1
# Model-section keys that describe training, not the trained function: dropped from the package.
TRAINING_ONLY_KEYS = ("hidden_dropout", "attention_dropout", "encoder_hidden_dropout", "encoder_attention_dropout",
                      "init_method_std", "tensor_model_parallel_size")


def tokenizer_entry(tokenizer) -> dict[str, Any]:
    """model_config.yaml's `tokenizer`: its library, the member files holding it, its identity."""
    from retro_toolkit.collections.text.tokenizer import HF_CONFIG, HF_FILE, SP_FILE

    if tokenizer.kind == "huggingface":
        entry = {"library": "huggingface", "model": NEMO_PREFIX + HF_FILE, "config": NEMO_PREFIX + HF_CONFIG}
    else:
        entry = {"library": "sentencepiece", "model": NEMO_PREFIX + SP_FILE}
    return {**entry, "sha256": tokenizer.sha256}


def model_config(section: dict[str, Any], weights: str, retrieval: bool, tokenizer) -> dict[str, Any]:
    """model_config.yaml's content for a model section (as checkpoints record it) and its tokenizer."""
    cfg = {k: v for k, v in section.items() if k not in TRAINING_ONLY_KEYS}
    cfg.update(
        target="retro_toolkit.collections.retro.model.RetroModel" if section.get("arch") == "retro"
        else "retro_toolkit.collections.retro.model.GPTTwinModel",
        retro_toolkit_package_version=FORMAT_VERSION,
        weights=weights,
        tokenizer=tokenizer_entry(tokenizer),
        retrieval=NEMO_PREFIX + RETRIEVAL_FILE if retrieval else None,
    )
    return cfg


def write_yaml(path: Path, obj: Any) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


@dataclass
class Package:
    """A restored package: the model (eval mode), its tokenizer, and what the package says."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    retrieval: Optional[dict[str, Any]]
    path: Path
    section: dict[str, Any] = field(default_factory=dict)


def _artifact(root: Path, ref: Any, key: str, path: Path) -> Path:
    if not isinstance(ref, str) or not ref.startswith(NEMO_PREFIX):
        raise UserError(f"{path}: model_config.yaml key '{key}' should reference an artifact as nemo:<file> "
                        f"(got {ref!r}).")
    name = ref[len(NEMO_PREFIX):]
    found = root / name
    if not found.is_file() or root.resolve() not in found.resolve().parents:
        raise UserError(f"{path}: model_config.yaml '{key}' names {name}, which the package does not contain.")
    return found


def read_config(path: str | os.PathLike, ours: bool = True) -> dict[str, Any]:
    """model_config.yaml of a package, without unpacking the weights; `ours=False` accepts any
    NeMo package's (e.g. NeMo 1.x's MegatronGPTModel)."""
    path = Path(path)
    with archive.open_checked(path) as tar:
        member = next((m for m in tar.getmembers() if os.path.normpath(m.name) == MODEL_CONFIG), None)
        if member is None or not member.isfile():
            raise UserError(f"{path} has no {MODEL_CONFIG}: it is not a .nemo package.")
        return _parse_config(tar.extractfile(member).read(), path, ours)


def _parse_config(data: bytes, path: Path, ours: bool = True) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(io.BytesIO(data))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: {MODEL_CONFIG} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: {MODEL_CONFIG} is not a mapping: not a .nemo package.")
    if ours and ("arch" not in cfg or "weights" not in cfg):
        raise UserError(f"{path}: {MODEL_CONFIG} lacks 'arch' or 'weights': not a retro_toolkit package.")
    return cfg


def section_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model section a package's config describes (what config_from_model_section reads)."""
    from retro_toolkit.collections.retro.config import stored_model_section

    drop = {"target", "retro_toolkit_package_version", "weights", "tokenizer", "retrieval"}
    return stored_model_section({k: v for k, v in cfg.items() if k not in drop})


def restore(path: str | os.PathLike, tensor_model_parallel_size: Optional[int] = None,
            device: Optional[str] = None, dtype: Any = None) -> Package:
    """The model of a .nemo package, ready for generation.

    tensor_model_parallel_size: default the size of the running job's parallel state (1 in a
    plain Python process). Under torchrun every rank calls restore and holds its shard.
    device: default cuda when available; dtype: e.g. torch.bfloat16 (default: as saved).
    The model is built in that dtype on that device, uninitialised, and the weights are
    copied in one tensor at a time from the memory-mapped file: peak memory is about the
    model's size in `dtype` (an fp32 package restored as bf16 never exists in fp32).
    """
    from retro_toolkit.checkpoint.mapped import MappedWeights
    from retro_toolkit.collections.retro import checkpointing as ckpt
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="retro_nemo_") as tmp:
        root, cfg, tokenizer, weights_at = _unpack(path, tmp)
        retrieval = None
        if cfg.get("retrieval") is not None:
            retrieval = yaml.safe_load(_artifact(root, cfg["retrieval"], "retrieval", path).read_text())
        section = section_of(cfg)
        if weights_at.name == WEIGHTS_FILE:
            weights = MappedWeights(weights_at)
            model = build_for(section, tokenizer, tensor_model_parallel_size, dtype or weights.dtype(), device)
            load_full(model, weights, path, after_copy=weights.release)
            del weights
        else:
            saved = ckpt.saved_dtype(weights_at)
            model = build_for(section, tokenizer, tensor_model_parallel_size, dtype or saved, device)
            ckpt.load_weights(weights_at, model)
    return Package(model.eval(), tokenizer, cfg, retrieval, path, section)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(model section, every tensor at its full shape by name, the tokenizer) of a
    package, without building its model (what `pretrain.init_from` loads a decoder from).
    A weights file is memory-mapped (the mapping outlives the unpacked file): a tensor's pages
    are read when it is copied, so a rank never holds the whole file in its own memory."""
    from retro_toolkit.checkpoint.mapped import MappedWeights
    from retro_toolkit.checkpoint.megatron_core import read_dist_tensors, to_toolkit

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="retro_nemo_") as tmp:
        _, cfg, tokenizer, weights_at = _unpack(path, tmp)
        tensors = (MappedWeights(weights_at) if weights_at.name == WEIGHTS_FILE
                   else to_toolkit(read_dist_tensors(weights_at)))  # dist names norms as TE fuses them
    return section_of(cfg), {k: tensors[k] for k in tensors if not k.endswith("_extra_state")}, tokenizer


def _unpack(path: Path, tmp: str) -> tuple[Path, dict[str, Any], Any, Path]:
    """(unpacked root, model_config.yaml, the tokenizer, the weights file or folder) of a package."""
    root = archive.extract(path, tmp)
    cfg_file = root / MODEL_CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{path} has no {MODEL_CONFIG}: it is not a .nemo package.")
    cfg = _parse_config(cfg_file.read_bytes(), path)
    tokenizer = _tokenizer(root, cfg, path)
    if cfg["weights"] == WEIGHTS_FILE:
        if not (root / WEIGHTS_FILE).is_file():
            raise UserError(f"{path}: {MODEL_CONFIG} says weights are in {WEIGHTS_FILE}, which is missing.")
        return root, cfg, tokenizer, root / WEIGHTS_FILE
    if cfg["weights"] == WEIGHTS_DIR:
        if not (root / WEIGHTS_DIR / "metadata.json").is_file():
            raise UserError(f"{path}: {MODEL_CONFIG} says weights are in {WEIGHTS_DIR}/, which holds no "
                            "dist checkpoint (metadata.json).")
        return root, cfg, tokenizer, root / WEIGHTS_DIR
    raise UserError(f"{path}: {MODEL_CONFIG} key 'weights' is {cfg['weights']!r}; expected "
                    f"{WEIGHTS_FILE} or {WEIGHTS_DIR}.")


def _tokenizer(root: Path, cfg: dict[str, Any], path: Path):
    """The tokenizer the package's `tokenizer` entry names (library sentencepiece or huggingface)."""
    from retro_toolkit.collections.text.hf_tokenizer import HFTokenizer
    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer

    entry = cfg.get("tokenizer") or {}
    library = entry.get("library", "sentencepiece")
    if library not in ("sentencepiece", "huggingface"):
        raise UserError(f"{path}: model_config.yaml's tokenizer.library is {library!r}; packages hold a "
                        "'sentencepiece' or 'huggingface' tokenizer.")
    model = _artifact(root, entry.get("model"), "tokenizer.model", path)
    if library == "huggingface":
        config = _artifact(root, entry.get("config"), "tokenizer.config", path)
        return HFTokenizer(model.read_bytes(), config.read_bytes(), f"{path}:{model.name}")
    return SentencePieceTokenizer.from_bytes(model.read_bytes(), f"{path}:{model.name}")


def build_for(section: dict[str, Any], tokenizer, tensor_model_parallel_size: Optional[int] = None,
              dtype: Any = None, device: Optional[str] = None):
    """A model of `section` to load weights into: dropout off, parameters allocated once and left
    uninitialised, in `dtype` (default float32) on `device` (default cuda when available), at
    the given tensor-parallel size (default: the running job's, or 1)."""
    import torch
    from megatron.core import parallel_state

    from retro_toolkit.collections.retro.config import config_from_model_section, inference_overrides
    from retro_toolkit.collections.retro.model import build_model
    from retro_toolkit.collections.retro.parallel import initialize

    tp = tensor_model_parallel_size
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config, args = config_from_model_section(section, neighbor_pad_id=tokenizer.pad_id, tensor_model_parallel_size=tp,
                                             **inference_overrides(dtype or torch.float32, device))
    initialize(tp)
    return build_model(config, args).to(device)


def full_state(model) -> dict[str, Any]:
    """This (unsharded) model's tensors by name, on the CPU, without megatron's _extra_state."""
    import torch

    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def load_full(model, full: Mapping[str, Any], where: Path | str,
              after_copy: Optional[Callable[[str], None]] = None) -> None:
    """An unsharded state dict into this rank's shards, after checking the names match exactly
    (`after_copy(name)` runs after each tensor is in)."""
    from retro_toolkit.collections.retro.full_state_dict import load_full_state_dict

    check_names(model, full, where)
    load_full_state_dict(model, full, after_copy)


def check_names(model, full: dict[str, Any], where: Path | str) -> None:
    """A full state dict must hold exactly this model's tensors: lists what is missing or extra."""
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    have = {k for k in full if not k.endswith("_extra_state")}
    missing, extra = sorted(own - have), sorted(have - own)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected {len(extra)}: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
        raise UserError(f"{where}: the weights do not match the model the config describes ({'; '.join(parts)}).")
