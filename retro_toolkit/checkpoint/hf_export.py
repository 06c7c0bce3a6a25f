"""The decoder of a .nemo package as a transformers model (`retro-run export-hf PKG --out DIR`).

InstructRetro's decoder works as a GPT on its own, so a Retro package (its chunked
cross-attention dropped) or a GPT twin package becomes the transformers architecture that
computes the same function:
  RMSNorm + SwiGLU, no biases                 -> LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases)
  LayerNorm + GELU, biases, RoPE, multi-head  -> GPTNeoXForCausalLM (sequential residual)
  LayerNorm + squared ReLU, no biases         -> NemotronForCausalLM
Anything else (learned absolute positions, megatron_core's decoder without a final norm,
biases on some layers only) is refused, naming the model keys no class expresses.
DIR gets config.json, generation_config.json, model.safetensors and the tokenizer for
transformers' AutoTokenizer: a Hugging Face tokenizer as the package holds it, or a
SentencePiece model as tokenizer.model beside its tokenizer.json (sentencepiece_convert.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from retro_toolkit.errors import UserError


def family(section: dict[str, Any]) -> str:
    """The transformers architecture computing this decoder, or a UserError saying why none does."""
    why = []
    if section.get("position_embedding_type", "rope") != "rope":
        why.append(f"position_embedding_type {section['position_embedding_type']} (the families read here use RoPE)")
    if section.get("flavor") == "megatron_core":
        why.append("flavor megatron_core (its decoder has no final norm; every transformers GPT has one)")
    norm, swiglu, bias = section.get("normalization", "LayerNorm"), section.get("swiglu", False), \
        section.get("add_bias_linear", True)
    relu2 = section.get("squared_relu", False)
    heads = section["num_attention_heads"]
    grouped = (section.get("num_query_groups") or heads) != heads
    if norm == "RMSNorm" and swiglu and not bias and not section.get("apply_layernorm_1p"):
        kind = "qwen2" if section.get("add_qkv_bias") else "llama"
        if section.get("rotary_percent", 1.0) != 1.0:
            why.append(f"rotary_percent {section['rotary_percent']} ({kind} rotates every channel)")
    elif norm == "LayerNorm" and relu2 and not bias and not section.get("add_qkv_bias"):
        kind = "nemotron"
    elif norm == "LayerNorm" and not swiglu and not relu2 and bias:
        kind = "gpt_neox"
        if grouped:
            why.append("num_query_groups with LayerNorm + GELU (GPT-NeoX has multi-head attention only)")
    else:
        kind = ""
        why.append(f"normalization {norm}, swiglu {swiglu}, squared_relu {relu2}, add_bias_linear {bias} (Llama/Qwen2 "
                   "take RMSNorm + SwiGLU without biases, GPT-NeoX LayerNorm + GELU with biases, Nemotron "
                   "LayerNorm + squared ReLU without biases)")
    if why:
        raise UserError("no transformers class computes this decoder: " + "; ".join(why) + ".")
    return kind


def hf_config(section: dict[str, Any], kind: str, special: dict[str, int]) -> Any:
    """The transformers config; `special`: the tokenizer's ids (end-of-document is the EOS)."""
    import transformers

    common = dict(bos_token_id=special.get("bos"), eos_token_id=special.get("eod"), pad_token_id=special.get("pad"),
                  vocab_size=section["vocab_size"], hidden_size=section["hidden_size"],
                  num_hidden_layers=section["num_layers"], num_attention_heads=section["num_attention_heads"],
                  intermediate_size=section["ffn_hidden_size"], max_position_embeddings=section["seq_length"],
                  tie_word_embeddings=not section.get("untie_embeddings_and_output_weights", False))
    rope = {"rope_type": "default", "rope_theta": float(section.get("rotary_base", 10000))}
    if section.get("rope_scaling_factor"):
        from retro_toolkit.checkpoint.hf_gpt import LLAMA3_ROPE

        rope.update(LLAMA3_ROPE, rope_type="llama3", factor=float(section["rope_scaling_factor"]))
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if kind == "gpt_neox":
        rope["partial_rotary_factor"] = float(section.get("rotary_percent", 1.0))
        return transformers.GPTNeoXConfig(**common, hidden_act="gelu", layer_norm_eps=section["layernorm_epsilon"],
                                          use_parallel_residual=False, attention_bias=True, rope_parameters=rope)
    groups = section.get("num_query_groups") or section["num_attention_heads"]
    if kind == "nemotron":
        rope["partial_rotary_factor"] = float(section.get("rotary_percent", 1.0))
        return transformers.NemotronConfig(**common, num_key_value_heads=groups, hidden_act="relu2",
                                           norm_eps=section["layernorm_epsilon"], rope_parameters=rope,
                                           attention_bias=False, mlp_bias=False)
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    extra = {"use_sliding_window": False} if kind == "qwen2" else {"attention_bias": False, "mlp_bias": False}
    return cls(**common, num_key_value_heads=groups,
               hidden_act="silu", rms_norm_eps=section["layernorm_epsilon"], rope_parameters=rope, **extra)


def hf_state(ours: dict[str, Any], section: dict[str, Any], kind: str) -> dict[str, Any]:
    """transformers' names and layouts for our decoder tensors (chunked cross-attention left out)."""
    heads = section["num_attention_heads"]
    groups = section.get("num_query_groups") or heads
    d = section["hidden_size"] // heads
    # Ours stores gamma - 1 under apply_layernorm_1p; Nemotron's LayerNorm1P always does.
    shift = (1.0 if section.get("apply_layernorm_1p") else 0.0) - (1.0 if kind == "nemotron" else 0.0)

    def norm(src: str, dst: str, out: dict[str, Any]) -> None:
        out[f"{dst}.weight"] = ours[f"{src}.weight"] + shift
        if f"{src}.bias" in ours:
            out[f"{dst}.bias"] = ours[f"{src}.bias"]

    out: dict[str, Any] = {}
    top = "gpt_neox" if kind == "gpt_neox" else "model"
    out[f"{top}.{'embed_in' if kind == 'gpt_neox' else 'embed_tokens'}.weight"] = ours["embedding.word_embeddings.weight"]
    norm("decoder.final_layernorm", f"{top}.{'final_layer_norm' if kind == 'gpt_neox' else 'norm'}", out)
    if "output_layer.weight" in ours and section.get("untie_embeddings_and_output_weights"):
        out["lm_head.weight"] = ours["output_layer.weight"]
    for i in range(section["num_layers"]):
        src, dst = f"decoder.layers.{i}", f"{top}.layers.{i}"
        norm(f"{src}.input_layernorm", f"{dst}.input_layernorm", out)
        norm(f"{src}.pre_mlp_layernorm", f"{dst}.post_attention_layernorm", out)
        qkv = f"{src}.self_attention.linear_qkv"
        if kind == "gpt_neox":  # both lay out each head's [q; k; v] rows in turn
            for suffix in ("weight", "bias"):
                out[f"{dst}.attention.query_key_value.{suffix}"] = ours[f"{qkv}.{suffix}"]
            for ours_name, theirs in (("self_attention.linear_proj", "attention.dense"),
                                      ("mlp.linear_fc1", "mlp.dense_h_to_4h"), ("mlp.linear_fc2", "mlp.dense_4h_to_h")):
                for suffix in ("weight", "bias"):
                    out[f"{dst}.{theirs}.{suffix}"] = ours[f"{src}.{ours_name}.{suffix}"]
            continue
        for suffix in ("weight", "bias") if kind == "qwen2" else ("weight",):
            t = ours[f"{qkv}.{suffix}"].reshape(groups, (heads // groups + 2) * d, -1)
            q, k, v = t.split([heads // groups * d, d, d], dim=1)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[f"{dst}.self_attn.{name}_proj.{suffix}"] = part.reshape(-1, *t.shape[2:]).squeeze(-1)
        out[f"{dst}.self_attn.o_proj.weight"] = ours[f"{src}.self_attention.linear_proj.weight"]
        if kind == "nemotron":
            out[f"{dst}.mlp.up_proj.weight"] = ours[f"{src}.mlp.linear_fc1.weight"]
        else:
            gate, up = ours[f"{src}.mlp.linear_fc1.weight"].chunk(2)
            out[f"{dst}.mlp.gate_proj.weight"], out[f"{dst}.mlp.up_proj.weight"] = gate, up
        out[f"{dst}.mlp.down_proj.weight"] = ours[f"{src}.mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_files(tokenizer, seq_length: int) -> dict[str, bytes]:
    """The files that make `tokenizer` load with AutoTokenizer.from_pretrained."""
    from retro_toolkit.collections.text import sentencepiece_convert as convert
    from retro_toolkit.collections.text.tokenizer import HF_CONFIG, HF_FILE

    if tokenizer.kind == "huggingface":
        return tokenizer.files()
    data, special = convert.tokenizer_json(tokenizer.proto, tokenizer.name)
    return {**tokenizer.files(), HF_FILE: data, HF_CONFIG: convert.tokenizer_config(special, seq_length)}


def export_hf(package: str | os.PathLike, out: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Write folder `out` (save_pretrained layout) with the decoder of `package` as a transformers model."""
    import transformers

    from retro_toolkit.checkpoint.nemo import restore

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; give a new folder (nothing is overwritten).")
    pkg = restore(package, tensor_model_parallel_size=1, device="cpu")
    section = pkg.section
    kind = family(section)
    ours = {k: v for k, v in pkg.model.state_dict().items() if not k.endswith("_extra_state")}
    model = transformers.AutoModelForCausalLM.from_config(hf_config(section, kind, pkg.tokenizer.special_ids()), dtype=next(iter(ours.values())).dtype)
    theirs = hf_state(ours, section, kind)
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:  # a bug in the mapping, not the user's input
        raise RuntimeError(f"export-hf mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        for name, data in tokenizer_files(pkg.tokenizer, section["seq_length"]).items():
            (staging / name).write_bytes(data)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"export-hf: {kind} ({section['num_layers']} layers, hidden {section['hidden_size']})"
        + (f"; chunked cross-attention left out ({section['arch']} package)" if section.get("arch") == "retro" else "")
        + f" -> {out}")
    return out
