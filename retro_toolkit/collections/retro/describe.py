"""A readable summary of a model piece (yaml/model/*.yaml): shape, CCA layers, parameters.

    from retro_toolkit.collections.retro.describe import describe_model
    print(describe_model("yaml/model/retro_48b.yaml"))

Parameters are counted on the meta device (`parameter_counts`): nothing is allocated or
initialised, so the 48B model takes a few seconds and no memory. `retro-run show-model`
prints this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from retro_toolkit.errors import UserError
from retro_toolkit.recipe.yaml_io import read_yaml

# InstructRetro's published parameter counts (docs/model_sizes.md), by file stem.
PUBLISHED = {
    "gpt_843m": (823e6, "823M"),
    "gpt_2b": (2.25e9, "2.25B"),
    "gpt_8b": (8.5e9, "8.5B"),
    "gpt_22b": (22e9, "22B"),
    "gpt_48b": (43e9, "43B"),
    "retro_843m": (878e6, "878M"),
    "retro_2b": (2.5e9, "2.5B"),
    "retro_8b": (9.5e9, "9.5B"),
    "retro_22b": (24e9, "24B"),
    "retro_48b": (48e9, "48B"),
}


def human(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B with three significant digits)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def load_model_section(path: str | Path) -> dict[str, Any]:
    """A model piece, or a recipe's `model:` section, as a plain dict."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"model file {str(p)!r} does not exist: pass a yaml/model/*.yaml piece, e.g. yaml/model/retro_tiny.yaml."
        )
    data = read_yaml(p, "model file")
    if isinstance(data, Mapping) and "num_layers" not in data and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or "num_layers" not in data:
        raise UserError(
            f"model file {str(p)!r} is not a model section: expected keys such as num_layers, hidden_size "
            "and num_attention_heads at the top level (see yaml/model/retro_tiny.yaml)."
        )
    return dict(data)


def describe_model(model_yaml_path: str, vocab_size: Optional[int] = None) -> str:
    """Shape, CCA layers and parameter counts (total and per part) of a model piece.

    `vocab_size` fills in a piece whose vocab_size is null (the tiny ones take it from the
    tokenizer); without either, a UserError says so.
    """
    from retro_toolkit.collections.retro.config import config_from_model_section
    from retro_toolkit.collections.retro.model import parameter_counts

    path = Path(model_yaml_path)
    section = load_model_section(path)
    if not section.get("vocab_size") and not vocab_size:
        raise UserError(
            f"{path} leaves vocab_size null (it comes from the tokenizer): pass a vocabulary size "
            "(e.g. show-model PATH --vocab-size 32000) or set vocab_size in the file."
        )
    config, args = config_from_model_section(section, vocab_size=vocab_size)
    counts = parameter_counts(config, args, detail=True)
    total = counts["total"]

    c = config
    lines = [
        f"model {path.stem} ({args.arch}): {human(total)} parameters ({total:,})",
        f"  layers {c.num_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads}, "
        f"ffn {c.ffn_hidden_size}{' (SwiGLU)' if c.gated_linear_unit else ''}, vocab {args.vocab_size:,}, "
        f"seq {args.max_sequence_length}",
        f"  {c.normalization}{'-1p' if c.layernorm_zero_centered_gamma else ''}, "
        f"{'no linear biases' if not c.add_bias_linear else 'linear biases'}, "
        f"position {c.position_embedding_type}"
        + (f" (rotary_percent {c.rotary_percent:g})" if c.position_embedding_type == "rope" else "")
        + f", {'tied' if args.share_embeddings_and_output_weights else 'untied'} embeddings",
    ]
    if c.cca_layers:
        lines.append(
            f"  retrieval: chunk {c.chunk_length}, k {c.num_neighbors}, r {c.retrieved_length} "
            f"({c.num_retrieved_chunks} chunks), encoder {c.encoder_num_layers} layers, gate {c.retrieval_gate:g}"
        )
        lines.append(
            f"  CCA layers (1-based, {len(c.cca_layers)}): {', '.join(map(str, c.cca_layers))}; "
            f"layer {c.cca_layers[0]} also runs the encoder"
        )
    else:
        lines.append("  CCA layers: none (decoder only)")

    rows = [
        ("embedding (input)", counts["embedding"]),
        ("decoder self-attention", counts["decoder_attention"]),
        ("decoder MLP", counts["decoder_mlp"]),
        ("decoder final norm", counts["final_norm"]),
    ]
    if c.cca_layers:
        rows += [("chunked cross-attention", counts["cca"]), ("neighbour encoder", counts["encoder"])]
    tied = " (tied: shared)" if args.share_embeddings_and_output_weights else ""
    rows.append((f"output layer{tied}", counts["output_layer"]))
    twin_label = "GPT twin (no CCA/encoder)"
    width = max([len(name) for name, _ in rows] + [len(twin_label)])
    lines.append("")
    lines.append(f"  {'part':<{width}}  {'parameters':>15}  {'share':>6}")
    for name, n in rows:
        lines.append(f"  {name:<{width}}  {n:>15,}  {n / total:>6.1%}")
    lines.append(f"  {'total':<{width}}  {total:>15,}  {1:>6.1%}")
    if c.cca_layers:
        gpt = total - counts["cca"] - counts["encoder"]
        lines.append(f"  {twin_label:<{width}}  {gpt:>15,}  {gpt / total:>6.1%}")

    published = PUBLISHED.get(path.stem)
    if published:
        figure, text = published
        lines.append("")
        lines.append(
            f"  published (InstructRetro): {text}; counted {human(total)} ({(total - figure) / figure:+.1%})"
        )
    return "\n".join(lines)
