"""The `export` stage: a training checkpoint becomes export/<name>.nemo.

    retro-run RECIPE --stages export
    from retro_toolkit.checkpoint.export import export_checkpoint, write_model

The checkpoint may have been trained at any tensor-parallel size: it is loaded into the
model at size 1 (megatron-core reshards on load) and written unsharded, so the package
restores at any size. export.weights=dist writes a megatron-core dist checkpoint instead
of one file, for models whose state dict should not pass through one torch.save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from retro_toolkit.checkpoint import archive
from retro_toolkit.checkpoint.nemo import (MODEL_CONFIG, RETRIEVAL_FILE, WEIGHTS_DIR, WEIGHTS_FILE, build_for, full_state,
                                           model_config, write_yaml)
from retro_toolkit.core import files
from retro_toolkit.core.stage import StageContext, StageResult
from retro_toolkit.errors import UserError

OUTPUT_DIR = "export"


def retrieval_settings(workdir: Path, recipe, section: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What a user needs to retrieve for this model: embedder, index, chunk length, k (None for GPT)."""
    if section.get("arch") != "retro":
        return None
    from retro_toolkit.collections.retrieval import db_version
    from retro_toolkit.collections.retrieval.build_db import NEIGHBORS_META

    out: dict[str, Any] = {
        "chunk_length": section["chunk_length"],
        "num_neighbors": section["num_neighbors"],
        "num_retrieved_chunks": section["num_retrieved_chunks"],
        "embedder": str(recipe.retrieval.embedder.path),
        "embedder_max_tokens": int(recipe.retrieval.embedder.max_tokens),
        "index": str(recipe.retrieval.index.string),
        "nprobe": int(recipe.retrieval.index.nprobe),
    }
    meta_file = workdir / NEIGHBORS_META
    if meta_file.is_file():  # what build_db actually built ("auto" resolved to a factory string)
        meta = files.read_json(meta_file)
        out.update(index=meta["index"], db_chunks=meta["db_chunks"], k_query=meta["k_query"],
                   tokenizer_sha256=meta["tokenizer_sha256"])
        trained_on = meta["splits"].get("train", {}).get("database_version", 1)
        out.update(database=db_version.brief(workdir), trained_on_database_version=trained_on)
    return out


def write_model(model, section: dict[str, Any], tokenizer, out: Path,
                retrieval: Optional[dict[str, Any]] = None, weights: str = "file") -> Path:
    """Package a model built from `section` (on every rank of its job) and its `tokenizer` (a
    Tokenizer, or the path of a SentencePiece .model, a tokenizer.json or its folder) as `out` (.nemo).

    weights "file" needs tensor-parallel size 1; "dist" works at any size. The package is
    assembled in a staging folder next to `out` and packed atomically by rank 0.
    """
    import torch
    import torch.distributed as td
    from megatron.core import dist_checkpointing, parallel_state

    from retro_toolkit.collections.text.tokenizer import Tokenizer, open_tokenizer
    from retro_toolkit.core import dist

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = open_tokenizer(tokenizer, "tokenizer")
    if weights not in ("file", "dist"):
        raise UserError(f"export.weights must be 'file' or 'dist' (got {weights!r}).")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if weights == "file" and tp > 1:
        raise UserError(f"export.weights=file writes one unsharded state dict, but the model is split over {tp} "
                        "tensor-parallel ranks: use weights=dist, or export from the checkpoint (export_checkpoint "
                        "loads it at tensor-parallel size 1).")
    is_main = not td.is_initialized() or td.get_rank() == 0
    out = Path(out)
    staging = out.with_name(f".{out.name}.staging")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    if weights == "dist":
        if is_main:
            (staging / WEIGHTS_DIR).mkdir()
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(staging / WEIGHTS_DIR))
    elif is_main:
        torch.save(full_state(model), staging / WEIGHTS_FILE)
    dist.barrier()
    if is_main:
        for name, data in tokenizer.files().items():
            (staging / name).write_bytes(data)
        if retrieval is not None:
            write_yaml(staging / RETRIEVAL_FILE, retrieval)
        # Stated, not left to defaults: a package without them reads as one from before they existed.
        section = {**section, "flavor": model.config.flavor, "encoder_rotary": model.config.encoder_rotary}
        cfg = model_config(section, WEIGHTS_FILE if weights == "file" else WEIGHTS_DIR, retrieval is not None,
                           tokenizer)
        write_yaml(staging / MODEL_CONFIG, cfg)
        archive.pack(staging, out)
        shutil.rmtree(staging)
    dist.barrier()
    return out


def export_checkpoint(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike,
                      retrieval: Optional[dict[str, Any]] = None, weights: str = "file",
                      log: Callable[[str], None] = print) -> Path:
    """Package a training checkpoint (checkpoints/<stage>[/iter_NNNNNNN], any tensor-parallel size);
    `tokenizer`: the one it was trained with (a SentencePiece .model, a tokenizer.json or its folder)."""
    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.config import stored_model_section
    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    source = ckpt.resolve(checkpoint, "export.checkpoint")
    common = ckpt.common_state(source)
    section = common.get("model_section")
    if section is None:
        raise UserError(f"{source} records no model section (an older retro_toolkit wrote it), so the package "
                        "could not say which model it holds. Retrain, or re-save it with this version.")
    section = stored_model_section(section)
    tok = open_tokenizer(tokenizer, "tokenizer")
    saved_sha = common.get("tokenizer_sha256")
    if saved_sha is not None and saved_sha != tok.sha256:
        raise UserError(f"{source} was trained with another tokenizer than {tokenizer} (sha256 "
                        f"{saved_sha[:12]} vs {tok.sha256[:12]}): package the tokenizer it was trained with.")
    if retrieval is not None:  # the checkpoint's own shapes win over the recipe's
        retrieval = None if section.get("arch") != "retro" else {
            **retrieval, **{k: section[k] for k in ("chunk_length", "num_neighbors", "num_retrieved_chunks")}}
    model = build_for(section, tok, 1, ckpt.saved_dtype(source))  # a bf16 run packs bf16
    ckpt.load_weights(source, model)
    log(f"export: weights from {source} (trained at tensor-parallel size {section.get('tensor_model_parallel_size', 1)})")
    return write_model(model, section, tok, Path(out), retrieval, weights)


def source_checkpoint(recipe, workdir: Path) -> Path:
    """export.checkpoint resolved: auto = sft when the recipe runs it, else pretrain."""
    choice = recipe.export.checkpoint
    if choice == "auto":
        choice = "sft" if "sft" in recipe.stages else "pretrain"
    return workdir / "checkpoints" / choice if choice in ("sft", "pretrain") else Path(choice)


def run(ctx: StageContext) -> StageResult:
    from retro_toolkit.collections.retro.engine import model_section
    from retro_toolkit.collections.text.tokenizer import TOKENIZER_DIR

    r, e = ctx.recipe, ctx.recipe.export
    name = e.name or r.name
    out = ctx.workdir / OUTPUT_DIR / f"{name}.nemo"
    retrieval = retrieval_settings(ctx.workdir, r, model_section(r, r.model.arch))
    export_checkpoint(source_checkpoint(r, ctx.workdir), ctx.workdir / TOKENIZER_DIR, out, retrieval, e.weights, ctx.log)
    outputs = [f"{OUTPUT_DIR}/{name}.nemo"]
    if e.safetensors and ctx.env.is_main:
        from retro_toolkit.checkpoint.safetensors_io import export_safetensors

        export_safetensors(out, ctx.workdir / OUTPUT_DIR / f"{name}.safetensors")
        outputs.append(f"{OUTPUT_DIR}/{name}.safetensors/model.safetensors")
    size = out.stat().st_size if ctx.env.is_main else 0
    ctx.log(f"export: wrote {out} ({size / 2**20:.1f} MiB): {', '.join(archive.names(out)) if ctx.env.is_main else ''}")
    return StageResult(outputs=outputs, summary={"package": str(out), "bytes": size})
