"""Training checkpoints: megatron-core dist checkpoints under checkpoints/<stage>/.

    checkpoints/pretrain/iter_0000100/   one dist checkpoint (model, optimizer, scheduler,
                                         per-rank RNG states, iteration, the model section)
    checkpoints/pretrain/latest          "iter_0000100", written last

A checkpoint is written to iter_NNNNNNN.tmp and renamed when every rank has finished, and
`latest` moves only after that, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as td
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel import random as mrandom

from retro_toolkit.core import dist, files
from retro_toolkit.errors import UserError

LATEST = "latest"
# Recipe model keys that may differ between a checkpoint and the model that evaluates it:
# they change training, not what the trained weights compute.
EVAL_FREE_KEYS = {
    "hidden_dropout", "attention_dropout", "encoder_hidden_dropout", "encoder_attention_dropout",
    "init_method_std", "cca_zero_init", "seq_length", "tensor_model_parallel_size",
}
# Keys only Retro has: a GPT checkpoint that Retro starts from may differ in these.
RETRIEVAL_KEYS = {"arch", "cca_layers", "chunk_length", "num_neighbors", "num_retrieved_chunks",
                  "encoder_num_layers", "retrieval_gate", "cca_rotary", "encoder_final_norm", "encoder_rotary"}


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under `root` (None if there is none)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "metadata.json").is_file() else None


def resolve(path: str | os.PathLike, key: str) -> Path:
    """A checkpoint folder from a user's path: a checkpoints/<stage> root (its latest) or one iter folder."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    found = latest(p)
    if found is None:
        raise UserError(
            f"{key}: {p} holds no finished checkpoint (no '{LATEST}' file pointing to an iter_NNNNNNN "
            "folder with metadata.json). Give a checkpoints/<stage> folder or one iter_NNNNNNN folder"
            + (", or for a GPT to start from: a .nemo package, a Hugging Face folder (config.json) or a "
               "Megatron-LM checkpoint folder (latest_checkpointed_iteration.txt)." if key.endswith("init_from")
               else ".")
        )
    return found


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_object() -> ShardedObject:
    rank, world = td.get_rank(), td.get_world_size()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": mrandom.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])


# The distributed optimizer's state as one tensor per buffer and rank, saved and loaded by every
# rank at once (megatron-core's default layout is deprecated and fails to build); it reshards
# across data-parallel sizes. The regular optimizer ignores the key.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def sharded_state(model, optimizer, is_loading: bool) -> dict[str, Any]:
    model_sd = model.sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return sd


def save(root: str | os.PathLike, iteration: int, model, optimizer, scheduler, common: dict[str, Any]) -> Path:
    """Write checkpoint `iteration` under root on every rank; returns its folder."""
    root = Path(root)
    final, tmp = root / iter_name(iteration), root / (iter_name(iteration) + ".tmp")
    if dist.env_from_os().is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = sharded_state(model, optimizer, is_loading=False)
    sd["rng"] = rng_object()
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    sd["iteration"] = iteration
    sd["world_size"] = td.get_world_size()
    sd["device"] = device_kind()
    sd.update(common)
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.env_from_os().is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        files.write_text(root / LATEST, final.name + "\n")
    dist.barrier()
    return final


def check_model_section(ckpt: Path, saved: dict[str, Any], current: dict[str, Any], free: set[str]) -> None:
    """Refuse a checkpoint of another model (size, norms, rotary, gate...), naming the keys that differ.
    A key the checkpoint predates counts at the behaviour it was trained with."""
    from retro_toolkit.collections.retro.config import stored_model_section

    saved, current = stored_model_section(saved), stored_model_section(current)
    keys = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
    if keys:
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {current.get(k)!r}" for k in keys)
        raise UserError(f"{ckpt} was written for another model ({diff}). Use a checkpoint of this model, "
                        "or set these model keys to the checkpoint's values.")


def check_tokenizer(ckpt: Path, common: dict[str, Any], workdir: Path) -> None:
    """The checkpoint's tokenizer must be the work directory's (same vocabulary size is not enough)."""
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    saved = common.get("tokenizer_sha256")
    current = workdir_tokenizer(workdir).sha256
    if saved is not None and saved != current:
        raise UserError(f"{ckpt} was trained with another tokenizer (sha256 {saved[:12]}, this work directory's "
                        f"{current[:12]}): token ids would mean different text. Use the checkpoint's tokenizer "
                        "(tokenizer.model=...) or a checkpoint trained with this one.")


def common_state(ckpt: Path) -> dict[str, Any]:
    return dist_checkpointing.load_common_state_dict(str(ckpt))


def load_weights(ckpt: Path, model) -> None:
    """Model weights only (evaluation, export): every model tensor must be in the checkpoint."""
    sd = model.sharded_state_dict()
    available = _tensor_shapes(ckpt)
    missing = [t.key for t in _sharded_tensors(sd) if t.key not in available]
    if missing:
        raise UserError(f"{ckpt} lacks {len(missing)} tensors of this model: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    _check_shapes(ckpt, sd, available)
    loaded = dist_checkpointing.load(sd, str(ckpt))
    model.load_state_dict({k: loaded[k] for k in sd})


def load_model(ckpt: Path, model, section: dict[str, Any], workdir: Path) -> None:
    """Weights from a checkpoint of this same model and tokenizer (evaluation, the twin's init_from).
    A GPT model has no retrieval, so for one the Retro-only keys (cca_layers...) may differ."""
    common = common_state(ckpt)
    free = EVAL_FREE_KEYS | (RETRIEVAL_KEYS - {"arch"}) if section.get("arch") == "gpt" else EVAL_FREE_KEYS
    if "model_section" in common:
        check_model_section(ckpt, common["model_section"], section, free=free)
    check_tokenizer(ckpt, common, workdir)
    load_weights(ckpt, model)


def saved_dtype(ckpt: Path) -> torch.dtype:
    """The dtype a dist checkpoint holds its model weights in (bf16 for a bf16 run): evaluation
    builds the model in it, so a bf16 model is never materialised in fp32."""
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    counts = Counter(v.dtype for k, v in meta.items() if not k.startswith("optimizer.") and hasattr(v, "dtype"))
    return counts.most_common(1)[0][0] if counts else torch.float32


def _sharded_tensors(sd: dict[str, Any]) -> list[ShardedTensor]:
    return [v for v in sd.values() if isinstance(v, ShardedTensor)]


def _tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return {k: tuple(v.global_shape) for k, v in meta.items() if hasattr(v, "global_shape")}


def _check_shapes(ckpt: Path, sd: dict[str, Any], available: dict[str, tuple[int, ...]]) -> None:
    bad = [(t.key, available[t.key], tuple(t.global_shape)) for t in _sharded_tensors(sd)
           if t.key in available and available[t.key] != tuple(t.global_shape)]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in bad[:6])
        raise UserError(f"{ckpt} is a checkpoint of another model size ({len(bad)} tensors differ: {lines}).")


def is_retrieval_param(name: str) -> bool:
    """Parameters a GPT checkpoint cannot have: chunked cross-attention (with the encoder it owns)."""
    return ".cross_attention." in name or ".pre_cross_attn_layernorm." in name


def init_from_gpt(ckpt: Path, model, section: dict[str, Any], workdir: Path) -> tuple[list[str], list[str]]:
    """Load a GPT (twin) checkpoint's decoder into a Retro model; returns (new, loaded) keys.

    The checkpoint must be a GPT model whose decoder settings equal this model's (norms,
    rotary, sizes) trained with this tokenizer. New parameters may only be chunked
    cross-attention and the encoder; a checkpoint tensor the model does not have, or one
    of another shape, is an error that lists them.
    """
    common = common_state(ckpt)
    saved = common.get("model_section")
    if saved is not None:
        if saved.get("arch") != "gpt":
            raise UserError(f"pretrain.init_from: {ckpt} is a {saved.get('arch')!r} checkpoint; init_from starts "
                            "Retro from a GPT (twin) checkpoint. To continue a Retro run, resume it instead.")
        check_model_section(ckpt, saved, section, free=EVAL_FREE_KEYS | RETRIEVAL_KEYS)
    check_tokenizer(ckpt, common, workdir)
    sd = model.sharded_state_dict()
    available = {k: v for k, v in _tensor_shapes(ckpt).items() if not k.startswith("optimizer.")}
    tensors = {t.key: (name, t) for name, t in sd.items() if isinstance(t, ShardedTensor)}
    new = sorted(k for k in tensors if k not in available)
    unexpected_new = [k for k in new if not is_retrieval_param(k)]
    unmatched = sorted(k for k in available if k not in tensors)
    if unexpected_new or unmatched:
        parts = []
        if unexpected_new:
            parts.append(f"model tensors missing from the checkpoint: {', '.join(unexpected_new[:10])}")
        if unmatched:
            parts.append(f"checkpoint tensors this model lacks: {', '.join(unmatched[:10])}")
        raise UserError(f"pretrain.init_from: {ckpt} does not match this model's decoder ("
                        + "; ".join(parts) + "). Use a checkpoint of the GPT twin of this model.")
    _check_shapes(ckpt, sd, available)
    wanted = {name: t for name, t in sd.items() if isinstance(t, ShardedTensor) and t.key in available}
    loaded = dist_checkpointing.load(wanted, str(ckpt))
    result = model.load_state_dict({k: loaded[k] for k in wanted}, strict=False)
    names_new = sorted(result.missing_keys)
    if [n for n in names_new if not is_retrieval_param(n)] or result.unexpected_keys:
        raise UserError(f"pretrain.init_from: loading {ckpt} left unexpected gaps: missing "
                        f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}.")
    return names_new, sorted(wanted)
