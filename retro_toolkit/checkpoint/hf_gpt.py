"""Read a Hugging Face GPT (a `save_pretrained` folder: Llama, Mistral, Qwen2, Nemotron) under our names.

    retro-run import-gpt Llama-2-7b-hf/ --out llama2-7b.nemo     (gpt_sources.import_gpt)

The model section comes from config.json (layers, widths, grouped-query heads, norm and epsilon,
RoPE base and rotated fraction, biases, tied or untied embeddings); the weights from model.safetensors or the shards
model.safetensors.index.json lists. Query, key and value are fused per key/value group as
megatron-core's linear_qkv holds them, and SwiGLU's gate and up projections into linear_fc1
(Nemotron's squared-ReLU MLP has no gate; its LayerNorm1P stores gamma - 1, as ours does).
What the toolkit's model would compute differently (RoPE scaling, sliding windows shorter than
the sequence, biases on some projections only) is refused, naming the config key.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Callable

from retro_toolkit.core import files
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.model import ModelConfig

ARCHITECTURES = ("llama", "mistral", "qwen2", "nemotron")
# Llama 3.1's RoPE scaling constants, the ones megatron-core's rotary embedding applies.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}
# The MLP activation each architecture's config.json must name.
ACTIVATION = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "nemotron": "relu2"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    cfg = files.read_user_json(path, str(path), "give a Hugging Face save_pretrained folder.")
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"{path}: model_type {kind!r} is not one this importer reads ({', '.join(ARCHITECTURES)}).")
    return cfg


def section_from_config(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our model section (a GPT) from a Llama-family config.json; keys it does not set at
    ModelConfig's defaults (Retro's keys only matter once the decoder is in a Retro model)."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise UserError(f"{where}: head_dim {cfg['head_dim']} differs from hidden_size / num_attention_heads "
                        f"({hidden // heads}); this toolkit's attention derives it from those.")
    # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; earlier files rope_theta and
    # rope_scaling {rope_type (or type), factor, ...}.
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    factor = _llama3_factor(scaling, where) if scaling else None
    kind = cfg["model_type"]
    if cfg.get("hidden_act", ACTIVATION[kind]) != ACTIVATION[kind]:
        raise UserError(f"{where}: hidden_act {cfg['hidden_act']!r}; {kind} models are read with "
                        f"{ACTIVATION[kind]} only.")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{where}: attention_bias / mlp_bias put biases on some linear layers only, which this "
                        "toolkit's model (add_bias_linear: all or none) cannot express.")
    seq = int(cfg.get("max_position_embeddings") or 4096)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < seq:
        seq = int(window)  # within one window sliding attention is full causal attention
    return {
        **dataclasses.asdict(ModelConfig()),
        "arch": "gpt",
        "num_layers": int(cfg["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_key_value_heads") or heads),
        "ffn_hidden_size": int(cfg["intermediate_size"]),
        "seq_length": seq,
        "vocab_size": int(cfg["vocab_size"]),
        "normalization": "LayerNorm" if kind == "nemotron" else "RMSNorm",
        "apply_layernorm_1p": kind == "nemotron",
        "layernorm_epsilon": float(cfg.get("norm_eps", 1e-5) if kind == "nemotron" else cfg.get("rms_norm_eps", 1e-6)),
        "swiglu": kind != "nemotron",
        "squared_relu": kind == "nemotron",
        "add_bias_linear": False,
        "add_qkv_bias": kind == "qwen2",
        "position_embedding_type": "rope",
        "rotary_percent": float(rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0),
        "rotary_base": int(rope.get("rope_theta") or cfg.get("rope_theta") or 10000),
        "rope_scaling_factor": factor,
        "untie_embeddings_and_output_weights": not cfg.get("tie_word_embeddings", False),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "flavor": "megatron_legacy",  # a final norm after the decoder, as every one of these has
    }


def _llama3_factor(scaling: dict[str, Any], where: Path) -> float:
    """The factor of Llama 3.1's RoPE scaling, the one kind (with its published constants) this
    toolkit's rotary embedding applies."""
    kind = scaling.get("rope_type") or scaling.get("type")
    constants = {k: scaling.get(k) for k in LLAMA3_ROPE}
    if kind != "llama3" or any(float(v or 0) != LLAMA3_ROPE[k] for k, v in constants.items()):
        raise UserError(f"{where}: RoPE scaling {scaling} is set; the only scaling this toolkit's rotary "
                        f"embedding applies is llama3 with {LLAMA3_ROPE} (Llama 3.1's), so the imported model "
                        "would compute something else.")
    return float(scaling["factor"])


def _shards(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = files.read_user_json(folder / INDEX, str(folder / INDEX), "download the model's index file.")
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{folder / INDEX} lists {len(missing)} shard(s) that are not in the folder: "
                            f"{', '.join(missing[:5])}. Download every shard the index names.")
        return [folder / f for f in shards]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise UserError(f"{folder} has neither {SINGLE} nor {INDEX}: save the model with safe_serialization=True "
                    "(pytorch_model.bin pickles are not read).")


def tensors(folder: Path) -> tuple[dict[str, Callable[[], Any]], Any]:
    """(name -> a function reading that tensor, the dtype most of them have), from the open
    shards: nothing is read until asked for, so a rank holds one tensor at a time, not the file."""
    from safetensors import safe_open

    from retro_toolkit.checkpoint.mapped import safetensors_dtype

    readers: dict[str, Callable[[], Any]] = {}
    dtypes: list[str] = []
    for shard in _shards(folder):
        f = safe_open(str(shard), framework="pt")  # stays open while a reader refers to it
        for name in f.keys():
            readers[name] = partial(f.get_tensor, name)
            dtypes.append(f.get_slice(name).get_dtype())
    return readers, safetensors_dtype(dtypes)


def rename(hf: dict[str, Callable[[], Any]], section: dict[str, Any], where: Path) -> dict[str, Callable[[], Any]]:
    """Our megatron-core names and layouts from the checkpoint's tensor readers (which this
    consumes), as readers: a fused tensor is made when it is asked for."""
    import torch

    heads, groups = section["num_attention_heads"], section["num_query_groups"]
    d = section["hidden_size"] // heads
    per_group = heads // groups

    def take(name: str) -> Callable[[], Any]:
        try:
            return hf.pop(name)
        except KeyError:
            raise UserError(f"{where}: the checkpoint has no tensor {name}.") from None

    def qkv(q: Any, k: Any, v: Any) -> Any:
        q = q.reshape(groups, per_group * d, *q.shape[1:])
        k, v = (t.reshape(groups, d, *t.shape[1:]) for t in (k, v))
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])

    def fused_qkv(prefix: str, suffix: str) -> Callable[[], Any]:
        q, k, v = (take(f"{prefix}.{p}_proj.{suffix}") for p in "qkv")
        return lambda: qkv(q(), k(), v())

    def gate_up(gate: Callable[[], Any], up: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: torch.cat([gate(), up()])

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}.weight")
        if section["normalization"] == "LayerNorm":
            out[f"{dst}.bias"] = take(f"{src}.bias")

    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
    norm("model.norm", "decoder.final_layernorm")
    if section["untie_embeddings_and_output_weights"]:
        out["output_layer.weight"] = take("lm_head.weight")
    else:
        hf.pop("lm_head.weight", None)  # the tied copy some checkpoints store
    for i in range(section["num_layers"]):
        src, dst = f"model.layers.{i}", f"decoder.layers.{i}"
        norm(f"{src}.input_layernorm", f"{dst}.input_layernorm")
        out[f"{dst}.self_attention.linear_qkv.weight"] = fused_qkv(f"{src}.self_attn", "weight")
        if section["add_qkv_bias"]:
            out[f"{dst}.self_attention.linear_qkv.bias"] = fused_qkv(f"{src}.self_attn", "bias")
        out[f"{dst}.self_attention.linear_proj.weight"] = take(f"{src}.self_attn.o_proj.weight")
        norm(f"{src}.post_attention_layernorm", f"{dst}.pre_mlp_layernorm")
        out[f"{dst}.mlp.linear_fc1.weight"] = (
            gate_up(take(f"{src}.mlp.gate_proj.weight"), take(f"{src}.mlp.up_proj.weight"))
            if section["swiglu"] else take(f"{src}.mlp.up_proj.weight"))
        out[f"{dst}.mlp.linear_fc2.weight"] = take(f"{src}.mlp.down_proj.weight")
    leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise UserError(f"{where}: {len(leftover)} checkpoint tensors map to nothing in the model: "
                        f"{', '.join(leftover[:8])}" + (" ..." if len(leftover) > 8 else ""))
    return out
