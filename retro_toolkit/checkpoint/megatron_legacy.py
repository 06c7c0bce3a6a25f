"""Import Megatron-LM's legacy Retro (and GPT) checkpoints, e.g. NVIDIA's released
retro-8b / retro-48b base and instruct models, into a .nemo package.

    import_checkpoint("retro-48b-instruct-4k/", "tokenizer.model", "retro48b.nemo")
    retro-run import-megatron retro-48b-instruct-4k/ --tokenizer tokenizer.model --out retro48b.nemo

The layout read: DIR/latest_checkpointed_iteration.txt ("release" or an iteration),
DIR/<release|iter_NNNNNNN>/mp_rank_<TT>/model_optim_rng.pt, one file per tensor-parallel
rank, each a dict with `args` (the training arguments), `checkpoint_version` and
`model` = {"language_model": {"embedding": ..., "encoder": ..., "output_layer": ...}} in
the legacy ParallelTransformer names. Shards are merged (column-parallel tensors along
their output rows, SwiGLU's two halves per rank kept apart; row-parallel ones along
their inputs) and renamed to this toolkit's megatron-core names; a tensor that maps to
nothing, or a model tensor nothing maps to, is an error listing them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, Callable, Iterator

from retro_toolkit.errors import UserError

IMPORT_DESCRIPTION = """\
Convert a Megatron-LM Retro or GPT checkpoint into a .nemo package that
`retro-run generate --nemo` and `restore()` load at any tensor-parallel size. Two layouts
are read, both under latest_checkpointed_iteration.txt:
  legacy (NVIDIA's released Retro / InstructRetro checkpoints): release/mp_rank_00/
    model_optim_rng.pt, mp_rank_01/... for tensor-parallel shards; model.flavor
    megatron_legacy;
  megatron-core torch_dist (megatron-core <= 0.15 RetroModel runs): iter_NNNNNNN/ with
    metadata.json, common.pt and *.distcp, written at any tensor-parallel size; model.flavor
    megatron_core.

The model's shape comes from the checkpoint's own `args`: layers, hidden size, heads,
FFN size, SwiGLU, norms, rotary settings, padded vocabulary, and Retro's chunk length,
neighbours, retrieved chunks and encoder layers. Shards are merged and renamed; unknown
or missing tensors are an error that lists them.

Safety: files are read with torch.load(weights_only=True), which only rebuilds tensors,
plain containers, numpy arrays (RNG states) and the argparse.Namespace of `args`. A
checkpoint that also pickled other objects (paths, enums, optimizer classes) is refused
with the name of the first such object. If you trust where the file came from,
--trust-checkpoint loads it with full pickle, which can run arbitrary code from the file.

examples:
  retro-run import-megatron retro-8b-instruct-4k/ --tokenizer retro-8b-instruct-4k/tokenizer.model \\
      --out retro8b.nemo
  retro-run generate --nemo retro8b.nemo --chat --prompt "Who wrote Hamlet?"
"""

ITERATION_FILE = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"

# Tensor-parallel layout of legacy tensors, by name suffix.
COLUMN_PARALLEL = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
                   "inter_attention.query.weight", "inter_attention.query.bias",
                   "inter_attention.key_value.weight", "inter_attention.key_value.bias",
                   "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                   "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("self_attention.dense.weight", "inter_attention.dense.weight", "mlp.dense_4h_to_h.weight")

# One transformer layer, legacy name -> ours. `{x}` is where a Retro cross-attention sits:
# "cross_attention.attention." in a decoder layer, "cross_attention." in the encoder's.
LAYER_NAMES = {
    "input_norm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "inter_attention.query": "{x}linear_q",
    "inter_attention.key_value": "{x}linear_kv",
    "inter_attention.dense": "{x}linear_proj",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}


def iteration_folder(folder: str | os.PathLike) -> Path:
    """The release/ or iter_NNNNNNN/ folder that latest_checkpointed_iteration.txt names."""
    folder = Path(folder)
    pointer = folder / ITERATION_FILE
    if not pointer.is_file():
        raise UserError(f"{folder} has no {ITERATION_FILE}: give the folder of a Megatron-LM checkpoint (the one "
                        "holding that file and release/ or iter_NNNNNNN/).")
    tag = pointer.read_text().strip()
    sub = folder / ("release" if tag == "release" else f"iter_{int(tag):07d}" if tag.isdigit() else tag)
    if not sub.is_dir():
        raise UserError(f"{pointer} says {tag!r} but {sub} does not exist.")
    return sub


def shard_files(sub: Path) -> list[Path]:
    """The model_optim_rng.pt of every tensor-parallel rank of an iteration folder, in rank order."""
    ranks = sorted(p for p in sub.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))
    if not ranks:
        raise UserError(f"{sub} holds no mp_rank_NN folders.")
    if any(re.fullmatch(r"mp_rank_\d+_\d+", p.name) for p in ranks):
        raise UserError(f"{sub} is split over pipeline stages (mp_rank_TT_PPP folders); only tensor-parallel "
                        "checkpoints (mp_rank_TT) are supported. Merge the pipeline stages with Megatron-LM's "
                        "checkpoint converter first.")
    want = [sub / f"mp_rank_{i:02d}" for i in range(len(ranks))]
    if ranks != want:
        raise UserError(f"{sub}: tensor-parallel folders {[p.name for p in ranks]} are not mp_rank_00.."
                        f"mp_rank_{len(ranks) - 1:02d}.")
    files = [p / SHARD_FILE for p in want]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"missing shard files: {', '.join(missing)}.")
    return files


class UpstreamEnum:
    """What an enum member of Megatron-LM's args (args.model_type = ModelType.retro_decoder...)
    loads as: its value only. The enums changed between releases (megatron-core 0.16 has no
    ModelType 4), and nothing here reads them."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"UpstreamEnum({self.value!r})"


UPSTREAM_ENUMS = ("megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
                  "megatron.core.transformer.enums.AttnMaskType", "megatron.model.enums.AttnMaskType",
                  "megatron.model.enums.LayerType", "megatron.model.enums.AttnType")


class _UpstreamUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return UpstreamEnum if f"{module}.{name}" in UPSTREAM_ENUMS else super().find_class(module, name)


# torch.load(pickle_module=...) for full pickle: the upstream enums load as UpstreamEnum.
_upstream_pickle = types.SimpleNamespace(**{**vars(pickle), "Unpickler": _UpstreamUnpickler})


def _name(g: Any) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


@contextlib.contextmanager
def _upstream_safe_globals(allowed: list) -> Iterator[None]:
    """weights_only loading with `allowed` added and, while it runs, without the real classes of
    the names UpstreamEnum stands for (megatron-core registers its own enums, which would win)."""
    import torch

    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals([g for g in before if _name(g) not in UPSTREAM_ENUMS] + allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_shard(path: Path, trust: bool) -> dict[str, Any]:
    import torch

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_upstream_pickle)
    allowed = [argparse.Namespace] + [(UpstreamEnum, name) for name in UPSTREAM_ENUMS]
    try:
        with _upstream_safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {m.group(1)}" if m else (str(e).strip().splitlines() or ["unknown"])[0]
        raise UserError(f"{path} needs full pickle to load ({what}): weights_only loading rebuilds only tensors, "
                        "plain containers, numpy arrays and the training args. If you trust the file's source, "
                        "rerun with --trust-checkpoint (full pickle can run code from the file).") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def normalise_name(name: str) -> str:
    """Checkpoint versions before 3.0 spelled norms *_layernorm."""
    return re.sub(r"(input|post_attention|post_inter_attention|final)_layernorm\b", r"\1_norm", name)


CHUNK_KEYS = ("retro_chunk_length", "retro_gpt_chunk_length")


def chunk_length(args: dict[str, Any]) -> int | None:
    """The Retro chunk length args record (megatron-core runs do; legacy training args do not:
    legacy Megatron-LM read it from <retro_workdir>/args.json)."""
    return next((int(args[k]) for k in CHUNK_KEYS if args.get(k)), None)


def read_retro_args(path: str | os.PathLike) -> dict[str, Any]:
    """A Retro workdir's args.json (what legacy Megatron-LM's validate_args read its Retro settings from)."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--retro-args {p} does not exist; give the Retro workdir's args.json.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--retro-args {p} is not a JSON file ({e}).") from None
    if not isinstance(data, dict) or chunk_length(data) is None:
        raise UserError(f"--retro-args {p} records no chunk length ({' or '.join(CHUNK_KEYS)}); it is not a "
                        "Retro workdir's args.json.")
    return data


def section_from_args(args: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our model section from Megatron-LM's training arguments."""
    def need(key: str) -> Any:
        if args.get(key) is None:
            raise UserError(f"{where}: the checkpoint's args lack '{key}'; cannot tell the model's shape.")
        return args[key]

    heads = int(need("num_attention_heads"))
    if args.get("group_query_attention") and int(args.get("num_query_groups") or heads) != heads:
        raise UserError(f"{where}: grouped-query attention (num_query_groups={args['num_query_groups']}) is not "
                        "supported by this importer; Retro's released models use full multi-head attention.")
    if int(args.get("num_experts") or 0) > 1:
        raise UserError(f"{where}: mixture-of-experts checkpoints are not supported.")
    if args.get("apply_residual_connection_post_layernorm"):
        raise UserError(f"{where}: the checkpoint was trained with apply_residual_connection_post_layernorm, "
                        "whose residuals are the normalised states in every layer; this toolkit's layers "
                        "add to the un-normalised stream (Megatron-LM's default), so it cannot be imported.")
    factor = args.get("rotary_seq_len_interpolation_factor")
    if factor not in (None, 1, 1.0):
        raise UserError(f"{where}: the checkpoint was trained with rotary_seq_len_interpolation_factor {factor} "
                        "(position interpolation), which this toolkit's rotary embedding does not apply; "
                        "it cannot be imported without changing what it computes.")
    retro = bool(args.get("retro_add_retriever"))
    chunk = chunk_length(args) or 64
    section = {
        "arch": "retro" if retro else "gpt",
        "num_layers": int(need("num_layers")),
        "hidden_size": int(need("hidden_size")),
        "num_attention_heads": heads,
        "ffn_hidden_size": int(args.get("ffn_hidden_size") or 4 * int(need("hidden_size"))),
        "seq_length": int(need("seq_length")),
        "vocab_size": int(need("padded_vocab_size")),
        "chunk_length": int(chunk),
        "num_neighbors": int(args.get("retro_num_neighbors") or 2),
        "num_retrieved_chunks": int(args.get("retro_num_retrieved_chunks") or 2),
        "encoder_num_layers": int(args.get("retro_encoder_layers") or 2),
        "cca_layers": None,
        "normalization": str(args.get("normalization") or "LayerNorm"),
        "apply_layernorm_1p": bool(args.get("apply_layernorm_1p", False)),
        "layernorm_epsilon": float(args.get("norm_epsilon") or args.get("layernorm_epsilon") or 1e-5),
        "swiglu": bool(args.get("swiglu", False)),
        "add_bias_linear": bool(args.get("add_bias_linear", True)),
        "position_embedding_type": str(args.get("position_embedding_type") or "learned_absolute"),
        "rotary_percent": float(args.get("rotary_percent") or 1.0),
        "rotary_base": int(args.get("rotary_base") or 10000),
        "untie_embeddings_and_output_weights": bool(args.get("untie_embeddings_and_output_weights", False)),
        # Legacy's --retro-attention-gate scales the CCA output as retrieval_gate does.
        "retrieval_gate": float(1.0 if args.get("retro_attention_gate") is None else args["retro_attention_gate"]),
        "cca_rotary": False,
        # The legacy model: a final norm after the decoder, no positions inside the encoder.
        "flavor": "megatron_legacy",
        "encoder_rotary": False,
    }
    if section["seq_length"] % section["chunk_length"]:
        hint = "" if chunk_length(args) else (" (64: the args do not record the chunk length; pass the Retro "
                                              "workdir's args.json as --retro-args)")
        raise UserError(f"{where}: seq_length {section['seq_length']} is not a multiple of the Retro chunk length "
                        f"{section['chunk_length']}{hint}.")
    return section


def merge_shards(shards: list[dict[str, Any]], swiglu: bool, where: Path) -> dict[str, Any]:
    """Full tensors from tensor-parallel shards (legacy names, flattened)."""
    import torch

    names = set(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != names:
            diff = sorted(names ^ set(s))[:6]
            raise UserError(f"{where}: shard mp_rank_{i:02d} holds other tensors than mp_rank_00 ({diff}).")
    full: dict[str, Any] = {}
    for name in sorted(names):
        parts = [s[name] for s in shards]
        if not isinstance(parts[0], torch.Tensor):
            continue
        if len(parts) == 1:
            full[name] = parts[0]
        elif name.endswith(COLUMN_PARALLEL):
            if swiglu and ".mlp.dense_h_to_4h." in name:
                halves = [torch.chunk(p, 2, dim=0) for p in parts]
                full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                full[name] = torch.cat(parts, dim=0)
        elif name.endswith(ROW_PARALLEL):
            full[name] = torch.cat(parts, dim=1)
        else:  # replicated: norms, row-parallel biases, position embeddings
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise UserError(f"{where}: {name} should be identical on every tensor-parallel rank but differs; "
                                "the shards do not belong to one checkpoint.")
            full[name] = parts[0]
    return full


def _layer(rest: str, ours_prefix: str, cross: str) -> str | None:
    for legacy, ours in LAYER_NAMES.items():
        if rest.startswith(legacy + "."):
            return ours_prefix + ours.format(x=cross) + rest[len(legacy):]
    return None


def rename(full: dict[str, Any], section: dict[str, Any], where: Path) -> tuple[dict[str, Any], list[str]]:
    """(our name -> tensor, legacy names that map to nothing)."""
    from retro_toolkit.collections.retro.config import default_cca_layers

    names = {normalise_name(raw): raw for raw in full}
    # A layer (decoder or encoder) cross-attends iff it holds inter_attention tensors.
    crossing = {n.split(".inter_attention.", 1)[0] + "." for n in names if ".inter_attention." in n}
    found = sorted(int(m.group(1)) + 1 for p in crossing
                   if (m := re.fullmatch(r"language_model\.encoder\.layers\.(\d+)\.", p)))
    rule = section["cca_layers"] or (default_cca_layers(section["num_layers"]) if section["arch"] == "retro" else [])
    if found != rule:
        raise UserError(f"{where}: chunked cross-attention sits in layers {found} (1-based) but Retro's rule for "
                        f"{section['num_layers']} layers puts it in {rule}; this importer expects the rule.")
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for name, raw in names.items():
        ours = None
        if name == "language_model.embedding.word_embeddings.weight":
            ours = "embedding.word_embeddings.weight"
        elif name == "language_model.embedding.position_embeddings.weight":
            ours = "embedding.position_embeddings.weight"
        elif name == "language_model.output_layer.weight":
            ours = "output_layer.weight"
        elif name.startswith("language_model.encoder.final_norm."):
            ours = "decoder.final_layernorm." + name.rsplit(".", 1)[1]
        else:
            m = re.fullmatch(r"language_model\.encoder\.layers\.(\d+)\.(retriever\.(?:layers\.(\d+)\.)?)?(.+)", name)
            if m:
                ours = _layer_name(m, crossing)
        if ours is None:
            unknown.append(raw)
        else:
            out[ours] = full[raw]
    return out, unknown


def _layer_name(m: re.Match, crossing: set[str]) -> str | None:
    i, retriever, j, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    decoder = f"decoder.layers.{i}."
    if retriever is None:
        return _in_layer(rest, decoder, f"language_model.encoder.layers.{i}." in crossing, "cross_attention.attention.")
    encoder = decoder + "cross_attention.encoder."
    if j is None:
        return encoder + "final_layernorm." + rest[len("final_norm."):] if rest.startswith("final_norm.") else None
    legacy_prefix = f"language_model.encoder.layers.{i}.retriever.layers.{j}."
    return _in_layer(rest, f"{encoder}layers.{j}.", legacy_prefix in crossing, "cross_attention.")


def _in_layer(rest: str, prefix: str, has_cross: bool, cross: str) -> str | None:
    # With cross-attention, the norm after self-attention feeds it and the norm after it
    # feeds the MLP; without, the norm after self-attention feeds the MLP.
    if rest.startswith("post_attention_norm."):
        target = "pre_cross_attn_layernorm." if has_cross else "pre_mlp_layernorm."
        return prefix + target + rest[len("post_attention_norm."):]
    if rest.startswith("post_inter_attention_norm."):
        return prefix + "pre_mlp_layernorm." + rest[len("post_inter_attention_norm."):]
    return _layer(rest, prefix, cross)


def import_checkpoint(folder: str | os.PathLike, tokenizer_file: str | os.PathLike, out: str | os.PathLike,
                      trust: bool = False, weights: str = "file", log: Callable[[str], None] = print,
                      retro_args: str | os.PathLike | None = None) -> Path:
    """Write `out` (.nemo) from a Megatron-LM checkpoint folder (legacy or megatron-core
    torch_dist) and its SentencePiece model. `retro_args`: the Retro workdir's args.json, whose
    settings (the chunk length) complete the checkpoint's args."""
    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.checkpoint.mapped import dtype_of
    from retro_toolkit.checkpoint.nemo import build_for, load_full
    from retro_toolkit.collections.text.tokenizer import Tokenizer

    folder, tokenizer_file = Path(folder), Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise UserError(f"--tokenizer {tokenizer_file} does not exist; give the model's SentencePiece .model file.")
    tokenizer = Tokenizer(tokenizer_file)
    extra = read_retro_args(retro_args) if retro_args is not None else {}
    sub = iteration_folder(folder)
    if (sub / "metadata.json").is_file():
        from retro_toolkit.checkpoint import megatron_core

        args, ours = megatron_core.read_dist(sub, trust)
        args = {**args, **extra}
        section = section_from_args(args, sub)
        section["flavor"] = megatron_core.FLAVOR
        kind = "megatron-core dist checkpoint"
    else:
        args, section, ours = _read_legacy(sub, trust, extra)
        kind = f"{int(args.get('tensor_model_parallel_size') or 1)} tensor-parallel shard(s)"
    if section["arch"] == "retro" and chunk_length(args) is None:
        log(f"import-megatron: the checkpoint's args do not record the chunk length (legacy Megatron-LM read it "
            f"from {args.get('retro_workdir') or '<retro_workdir>'}/args.json); taking Retro's 64. If the run used "
            "another, pass that file as --retro-args.")
    if tokenizer.vocab_size > section["vocab_size"]:
        raise UserError(f"--tokenizer {tokenizer_file} has {tokenizer.vocab_size} pieces but the checkpoint's "
                        f"embedding has {section['vocab_size']} rows: it is not this model's tokenizer.")
    log(f"import-megatron: {section['arch']} model, {section['num_layers']} layers, hidden {section['hidden_size']}, "
        f"{kind}")
    model = build_for(section, tokenizer, 1, dtype_of(ours))
    load_full(model, ours, folder)
    retrieval = None
    if section["arch"] == "retro":
        retrieval = {k: section[k] for k in ("chunk_length", "num_neighbors", "num_retrieved_chunks")}
        # What the checkpoint recorded about its database (embedder, index string...), as it spelled it.
        retrieval["megatron_args"] = {k: v for k, v in sorted(args.items())
                                      if k.startswith("retro_") and isinstance(v, (str, int, float, bool))}
        retrieval["source"] = f"Megatron-LM checkpoint {folder.resolve()}"
    return write_model(model, section, tokenizer_file, Path(out), retrieval, weights)


def _read_legacy(sub: Path, trust: bool, extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(args completed by `extra`, model section, tensors under our names) of a legacy iteration folder."""
    paths = shard_files(sub)
    folder = sub.parent
    shards, args = [], None
    for p in paths:
        sd = load_shard(p, trust)
        if "model" not in sd or "args" not in sd:
            raise UserError(f"{p} has no 'model' or 'args' entry: not a Megatron-LM model checkpoint.")
        version = float(sd.get("checkpoint_version", 0))
        if version < 2.0:
            raise UserError(f"{p} has checkpoint_version {version}; only 2.0 and later (query/key/value rows "
                            "grouped per head) are supported. Re-save it with a recent legacy Megatron-LM.")
        if args is None:
            args = {**(dict(sd["args"]) if isinstance(sd["args"], dict) else vars(sd["args"])), **extra}
        shards.append(flatten(sd["model"]))
        del sd
    section = section_from_args(args, paths[0])
    tp = int(args.get("tensor_model_parallel_size") or 1)
    if tp != len(paths):
        raise UserError(f"{folder}: the args say tensor_model_parallel_size {tp} but there are {len(paths)} shards.")
    if int(args.get("pipeline_model_parallel_size") or 1) != 1:
        raise UserError(f"{folder}: pipeline_model_parallel_size is {args['pipeline_model_parallel_size']}; "
                        "only tensor-parallel checkpoints are supported.")
    full = merge_shards(shards, section["swiglu"], folder)
    del shards
    ours, unknown = rename(full, section, folder)
    if unknown:
        raise UserError(f"{folder}: {len(unknown)} checkpoint tensors map to nothing in the model: "
                        f"{', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
    return args, section, ours
