"""Read a NeMo 1.x `megatron_gpt` package (e.g. NVIDIA's GPT-2B-001 or Nemotron-3-8B-Base-4k).

The package is a tar holding model_config.yaml (MegatronGPTModel's settings), the
SentencePiece tokenizer it names (`tokenizer.model: nemo:<file>`), and the weights in one of
three layouts: model_weights.ckpt (one state dict), mp_rank_XX/model_weights.ckpt (one per
tensor-parallel rank) or model_weights/ (a megatron-core torch_dist checkpoint). Tensor names
are NeMo's `model.` (`model.module.` under megatron_amp_O2) followed by the legacy
ParallelTransformer names (mcore_gpt false) or megatron-core's (mcore_gpt true, norms fused
into Transformer Engine's linear_qkv / linear_fc1).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from retro_toolkit.checkpoint.megatron_legacy_shards import LEGACY, Layout, merge_shards
from retro_toolkit.errors import UserError

NORMS = {"layernorm": ("LayerNorm", False), "layernorm1p": ("LayerNorm", True), "rmsnorm": ("RMSNorm", False)}
ACTIVATIONS = {"gelu": {}, "swiglu": {"swiglu": True}, "fast-swiglu": {"swiglu": True},
               "squared-relu": {"squared_relu": True}}
# megatron-core names split over tensor-parallel ranks: along the output rows, or the inputs.
_COLUMN = re.compile(r"(linear_qkv|linear_fc1)\.(weight|bias)$|word_embeddings\.weight$|output_layer\.weight$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
MCORE = Layout(lambda n: bool(_COLUMN.search(n)), lambda n: bool(_ROW.search(n)), ".mlp.linear_fc1.")


def is_nemo1(config: dict[str, Any]) -> bool:
    return str(config.get("target", "")).endswith("MegatronGPTModel")


def section_from_config(cfg: dict[str, Any], vocab_size: int, where: Path) -> dict[str, Any]:
    """Our model section (a GPT) from MegatronGPTModel's config."""
    import dataclasses

    from retro_toolkit.recipe.model import ModelConfig

    def choice(key: str, table: dict[str, Any], default: str) -> Any:
        value = str(cfg.get(key) or default).lower()
        if value not in table:
            raise UserError(f"{where}: {key} {value!r} is not one this importer reads ({', '.join(table)}).")
        return table[value]

    norm, one_p = choice("normalization", NORMS, "layernorm")
    if cfg.get("seq_len_interpolation_factor") not in (None, 1, 1.0):
        raise UserError(f"{where}: seq_len_interpolation_factor {cfg['seq_len_interpolation_factor']} (RoPE "
                        "position interpolation) is set; this toolkit's rotary embedding applies none.")
    heads = int(cfg["num_attention_heads"])
    return {
        **dataclasses.asdict(ModelConfig()),
        **choice("activation", ACTIVATIONS, "gelu"),
        "arch": "gpt",
        "num_layers": int(cfg["num_layers"]),
        "hidden_size": int(cfg["hidden_size"]),
        "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_query_groups") or heads),
        "ffn_hidden_size": int(cfg["ffn_hidden_size"]),
        "seq_length": int(cfg.get("encoder_seq_length") or cfg.get("max_position_embeddings") or 2048),
        "vocab_size": vocab_size,
        "normalization": norm,
        "apply_layernorm_1p": one_p or bool(cfg.get("layernorm_zero_centered_gamma")),
        "layernorm_epsilon": float(cfg.get("layernorm_epsilon") or 1e-5),
        "add_bias_linear": bool(cfg.get("bias", True)),
        "position_embedding_type": str(cfg.get("position_embedding_type") or "learned_absolute"),
        "rotary_percent": float(cfg.get("rotary_percentage") or 1.0),
        "rotary_base": int(cfg.get("rotary_base") or 10000),
        "untie_embeddings_and_output_weights": not cfg.get("share_embeddings_and_output_weights", True),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "flavor": "megatron_legacy",
    }


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if k.endswith("_extra_state"):
            continue
        name = k[len("model."):] if k.startswith("model.") else k
        out[name[len("module."):] if name.startswith("module.") else name] = v
    return out


def _weights(root: Path, trust: bool, where: Path) -> list[dict[str, Any]]:
    """The package's state dicts, one per tensor-parallel rank, with NeMo's prefix stripped."""
    from retro_toolkit.checkpoint.megatron_core import read_dist_tensors
    from retro_toolkit.checkpoint.megatron_files import load_shard

    if (root / "model_weights" / "metadata.json").is_file():
        return [_strip(read_dist_tensors(root / "model_weights"))]
    if (root / "model_weights.ckpt").is_file():
        return [_strip(load_shard(root / "model_weights.ckpt", trust))]
    ranks = sorted(root.glob("mp_rank_*/model_weights.ckpt"))
    if not ranks:
        raise UserError(f"{where} holds no weights (model_weights.ckpt, mp_rank_XX/model_weights.ckpt or "
                        "model_weights/): not a complete NeMo package.")
    if any(p.parent.name.count("_") > 2 for p in ranks):  # mp_rank_TT_PPP
        raise UserError(f"{where}: pipeline-parallel shards are not read.")
    if [p.parent.name for p in ranks] != [f"mp_rank_{i:02d}" for i in range(len(ranks))]:
        raise UserError(f"{where}: tensor-parallel folders {[p.parent.name for p in ranks]} are not "
                        "mp_rank_00.. in sequence; a shard is missing.")
    return [_strip(load_shard(p, trust)) for p in ranks]


def read_nemo1(path: Path, trust: bool = False) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(model section, unsharded tensors under our names, the SentencePiece model's bytes)."""
    import yaml

    from retro_toolkit.checkpoint import archive
    from retro_toolkit.checkpoint.megatron_core import rename as rename_mcore
    from retro_toolkit.checkpoint.megatron_legacy_names import rename as rename_legacy

    with tempfile.TemporaryDirectory(prefix="nemo1_") as tmp:
        root = archive.extract(path, tmp)
        cfg = yaml.safe_load((root / "model_config.yaml").read_text(encoding="utf-8")) or {}
        if not is_nemo1(cfg):
            raise UserError(f"{path}: model_config.yaml's target is {cfg.get('target')!r}, not NeMo's "
                            "MegatronGPTModel.")
        tok = cfg.get("tokenizer") or {}
        if tok.get("library") != "sentencepiece" or not str(tok.get("model", "")).startswith("nemo:"):
            raise UserError(f"{path}: the tokenizer is {tok.get('library')!r} ({tok.get('model')}); only a "
                            "SentencePiece model inside the package is read.")
        tok_file = root / str(tok["model"])[len("nemo:"):]
        if not tok_file.is_file():
            raise UserError(f"{path}: model_config.yaml names tokenizer {tok['model']}, which the package lacks.")
        shards = _weights(root, trust, path)
        tokenizer = tok_file.read_bytes()
    mcore = "embedding.word_embeddings.weight" in shards[0]
    swiglu = str(cfg.get("activation", "")).lower().endswith("swiglu")
    if not mcore and any(".dense_h_to_4h_2." in k for k in shards[0]):  # NeMo's unfused swiglu
        import torch

        for s in shards:
            for k in [k for k in s if ".dense_h_to_4h_2." in k]:
                s[k.replace(".dense_h_to_4h_2.", ".dense_h_to_4h.")] = torch.cat(
                    [s[k.replace(".dense_h_to_4h_2.", ".dense_h_to_4h.")], s.pop(k)])
    merged = merge_shards(shards, swiglu, path, MCORE if mcore else LEGACY)
    embedding = "embedding.word_embeddings.weight" if mcore else "language_model.embedding.word_embeddings.weight"
    section = section_from_config(cfg, merged[embedding].shape[0], path)
    if mcore:
        full = {rename_mcore(k): v for k, v in merged.items()}
    else:
        full, unknown = rename_legacy(merged, section, path)
        if unknown:
            raise UserError(f"{path}: {len(unknown)} tensors map to nothing in the model: {', '.join(unknown[:8])}")
    return section, full, tokenizer
