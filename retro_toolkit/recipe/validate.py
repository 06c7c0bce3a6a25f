"""Check a composed recipe against the schema and say exactly what is wrong.

The checker walks the dataclasses itself (rather than relying on OmegaConf's merge
errors) so that every message carries the full key, list indices included, the
offending value, the expected type and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retro_toolkit.collections.text.splits import SPLIT_BY
from retro_toolkit.errors import UserError
from retro_toolkit.recipe.executors import EXECUTOR_SCHEMAS, MODEL_PARALLEL_STAGES, NOT_PER_STAGE, for_stage, processes
from retro_toolkit.recipe.schema import MODEL_FLAVORS, POSITION_TYPES, STAGE_NAMES, Recipe

_MISSING = "???"


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, for 'did you mean' across sections."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += _all_keys(t, key + ".")
    return out


def _nearest(key: str, candidates: list[str], full_candidates: list[str]) -> str:
    local = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if local:
        return local[0]
    leaf = key.rsplit(".", 1)[-1]
    for cand in full_candidates:  # same name in another section (e.g. top-level vocab_size)
        if cand.rsplit(".", 1)[-1] == leaf:
            return cand
    hits = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in full_candidates], n=1)
    return next((c for c in full_candidates if hits and c.endswith("." + hits[0])), "")


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(t):
        return "a mapping"
    return getattr(t, "__name__", str(t))


class _Checker:
    def __init__(self, root_cls: type) -> None:
        self.full_keys = _all_keys(root_cls)

    def check(self, value: Any, t: Any, key: str) -> Any:
        if isinstance(value, str) and value == _MISSING:
            raise UserError(f"recipe key '{key}' is required but not set. Set it in the recipe or as {key}=...")
        origin = typing.get_origin(t)
        if t is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if value is None:
                return None
            return self.check(value, args[0], key)
        if dataclasses.is_dataclass(t):
            return self.check_dataclass(value, t, key)
        if origin is list:
            if not isinstance(value, list):
                self._wrong(key, value, t)
            (item_t,) = typing.get_args(t)
            return [self.check(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self._wrong(key, value, t)
            return {str(k): self.check(v, typing.get_args(t)[1], f"{key}.{k}") for k, v in value.items()}
        if t is bool:
            if not isinstance(value, bool):
                self._wrong(key, value, t)
            return value
        if t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self._wrong(key, value, t)
            return value
        if t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self._wrong(key, value, t)
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)) or value is None:
                self._wrong(key, value, t)
            return str(value)
        raise TypeError(f"schema type {t} of {key} is not supported")  # a bug in schema.py

    def check_dataclass(self, value: Any, cls: type, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self._wrong(key, value, cls)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        out = {}
        for k in value:
            if k not in names:
                full = f"{key}.{k}" if key else str(k)
                prefix = f"{key}." if key else ""
                near = _nearest(str(k), names, self.full_keys)
                if near and "." not in near:
                    near = prefix + near
                raise UserError(
                    f"unknown recipe key '{full}'."
                    + (f" Did you mean '{near}'?" if near else "")
                    + f" Valid keys here: {', '.join(prefix + n for n in names)}."
                )
        for f in dataclasses.fields(cls):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name in value:
                out[f.name] = self.check(value[f.name], hints[f.name], sub)
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = OmegaConf.to_container(OmegaConf.create({"v": f.default_factory()}))["v"]
            else:
                raise UserError(f"recipe key '{sub}' is required but not set. Set it in the recipe or as {sub}=...")
        return out

    @staticmethod
    def _wrong(key: str, value: Any, t: Any) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise UserError(
            f"recipe key '{key}' has the wrong type: got {shown} ({type(value).__name__}), "
            f"expected {_type_name(t)}."
        )


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    defaults = OmegaConf.structured(Recipe)
    plain = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(defaults)), cfg)
    try:
        return OmegaConf.to_container(plain, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"cannot resolve recipe key '{key}': {msg}.") from None


def _unset_keys(value: Any, key: str = "") -> list[str]:
    """Every key still holding OmegaConf's '???' (required, not set), in document order."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _unset_keys(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _unset_keys(v, f"{key}[{i}]")]
    return [key] if value == "???" else []


def _check_choice(value: str, choices: tuple[str, ...] | list[str], key: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, list(choices), n=1)
        raise UserError(
            f"recipe key '{key}' = '{value}' is not one of {', '.join(choices)}."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
        )


# Integer keys and their allowed range (lowest, highest, both inclusive), with the reason
# a user reads for the upper one. The upper bounds are far beyond any real run, so they only catch
# typos (an extra zero run, 1e30) here instead of as a crash or a huge allocation in a stage.
# "[]" stands for any list index; executor keys also cover executor.stages.<stage>.<key>.
_INT32 = 2**31 - 1
_STEPS = 10**9
_VOCAB = 10_000_000
_WHY_VOCAB = (f"no real vocabulary has more than {_VOCAB:,} entries (the embedding has a row per entry; "
              "token ids are stored as uint16/uint32)")
_WHY_SHAPE = "far beyond any real model (check for a typo)"
_WHY_STEPS = "a billion steps is far beyond any real run (check for a typo)"
_WHY_BATCH = "far beyond what fits in memory (check for a typo)"
_WHY_SEED = "seeds are 32-bit (SentencePiece, numpy and torch take them)"
_WHY_COUNT = "far beyond any real data set (check for a typo)"
_WHY_CLUSTER = "far beyond any real machine or cluster (check for a typo)"
INT_BOUNDS: dict[str, tuple[int, int, str]] = {
    "seed": (0, _INT32, _WHY_SEED),
    "tokenizer.vocab_size": (16, _VOCAB, _WHY_VOCAB),
    "tokenizer.train_max_lines": (1, _INT32, "far more lines than SentencePiece can hold in memory"),
    "data.passage_chars": (1, 10**9, "a passage of a billion characters is a typo"),
    "data.tokenize_batch_docs": (1, 10**7, _WHY_BATCH),
    "data.sources[].max_docs": (1, 10**12, _WHY_COUNT),
    "model.vocab_size": (16, _VOCAB, _WHY_VOCAB),
    "model.num_layers": (1, 1024, _WHY_SHAPE),
    "model.hidden_size": (1, 2**17, _WHY_SHAPE),
    "model.num_attention_heads": (1, 2**14, _WHY_SHAPE),
    "model.ffn_hidden_size": (1, 2**19, _WHY_SHAPE),
    "model.seq_length": (1, 2**20, _WHY_SHAPE),
    "model.chunk_length": (1, 2**16, _WHY_SHAPE),
    "model.num_neighbors": (1, 1024, _WHY_SHAPE),
    "model.num_retrieved_chunks": (1, 1024, _WHY_SHAPE),
    "model.encoder_num_layers": (1, 1024, _WHY_SHAPE),
    "model.rotary_base": (1, 10**9, _WHY_SHAPE),
    "model.tensor_model_parallel_size": (1, 1024, _WHY_CLUSTER),
    "retrieval.embedder.max_tokens": (1, 2**16, "BERT models take at most a few thousand tokens"),
    "retrieval.embedder.batch_size": (1, 2**20, _WHY_BATCH),
    "retrieval.index.ntrain": (1, _INT32, "far more vectors than an index is trained on (check for a typo)"),
    "retrieval.index.nprobe": (1, 2**20, "more lists than any index has"),
    "retrieval.k_query": (1, 2048, "faiss's GPU search returns at most 2048 neighbours per query"),
    "retrieval.num_candidates": (1, 2048, "at most retrieval.k_query"),
    "retrieval.block_size": (1, 10**7, "one block's embeddings must fit in memory"),
    "retrieval.extra_sources[].max_docs": (1, 10**12, _WHY_COUNT),
    "retrieval.seed": (0, _INT32, _WHY_SEED),
    "eval_ppl.max_samples": (1, 10**12, _WHY_COUNT),
    "eval_ppl.micro_batch_size": (1, 2**20, _WHY_BATCH),
    "sft.seq_length": (1, 2**20, _WHY_SHAPE),
    "eval_qa.tasks[].max_samples": (1, 10**12, _WHY_COUNT),
    "eval_qa.max_new_tokens": (1, 2**20, _WHY_SHAPE),
    "eval_qa.batch_size": (1, 2**20, _WHY_BATCH),
    "executor.nproc_per_node": (1, 1024, _WHY_CLUSTER),
    "executor.nodes": (1, 100_000, _WHY_CLUSTER),
    "executor.ntasks_per_node": (1, 1024, _WHY_CLUSTER),
    "executor.gpus_per_node": (0, 1024, _WHY_CLUSTER),
    "executor.cpus_per_task": (1, 100_000, _WHY_CLUSTER),
    "executor.num_gpus": (-1, 1024, _WHY_CLUSTER),
}
for _sec in ("pretrain", "sft"):
    INT_BOUNDS |= {
        f"{_sec}.train_iters": (1, _STEPS, _WHY_STEPS),
        f"{_sec}.micro_batch_size": (1, 2**20, _WHY_BATCH),
        f"{_sec}.global_batch_size": (1, 2**30, _WHY_BATCH),
        f"{_sec}.lr_warmup_iters": (0, _STEPS, _WHY_STEPS),
        f"{_sec}.lr_decay_iters": (1, _STEPS, _WHY_STEPS),
        f"{_sec}.save_interval": (0, _STEPS, _WHY_STEPS),
        f"{_sec}.log_interval": (1, _STEPS, _WHY_STEPS),
    }
# Every other integer is handed to numpy or torch at some point: it must fit 64 bits.
_INT64 = (-(2**63), 2**63 - 1)
# Sections checked only when their stage runs (as their other checks are).
_GATED_SECTIONS = ("sft", "eval_qa")


def _bound_pattern(key: str) -> str:
    """`data.sources[3].max_docs` -> `data.sources[].max_docs`; per-stage executor keys -> executor.<key>."""
    pattern = re.sub(r"\[\d+\]", "[]", key)
    if pattern.startswith("executor.stages."):
        parts = pattern.split(".")
        pattern = ".".join(["executor", *parts[3:]])
    return pattern


def _shown(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:37]}... ({len(str(abs(value)))} digits)"


def _check_number(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"recipe key '{key}' must be a finite number (got {value}).")
    if isinstance(value, bool) or not isinstance(value, int):
        return
    lo, hi, why = INT_BOUNDS.get(_bound_pattern(key), (*_INT64, "integers must fit 64 bits"))
    if value < lo:
        raise UserError(f"recipe key '{key}' must be at least {lo} (got {_shown(value)}).")
    if value > hi:
        raise UserError(f"recipe key '{key}' must be at most {hi:,} (got {_shown(value)}): {why}.")


def _check_ranges(value: Any, key: str = "", stages: tuple[str, ...] = ()) -> None:
    """Every number in the checked recipe against INT_BOUNDS (and finite), before the checks
    that compute with them: a billion layers must not build a billion-entry list first."""
    if isinstance(value, dict):
        for name, sub in value.items():
            if not key and name in _GATED_SECTIONS and name not in stages:
                continue
            _check_ranges(sub, f"{key}.{name}" if key else str(name), stages)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_ranges(sub, f"{key}[{i}]", stages)
    else:
        _check_number(value, key)


def _abspath(p: str) -> str:
    return str(Path(os.path.expanduser(p)).resolve())


def _semantic(r: dict[str, Any]) -> None:
    """Checks the types cannot express; paths become absolute so jobs find them anywhere."""
    seen = set()
    for i, s in enumerate(r["stages"]):
        _check_choice(s, STAGE_NAMES, f"stages[{i}]")
        if s in seen:
            raise UserError(f"stage '{s}' is listed twice in 'stages'.")
        seen.add(s)
    if not r["stages"]:
        raise UserError("recipe key 'stages' is empty: list the stages to run, e.g. [tokenizer, prepare_corpus].")

    d = r["data"]
    split = d["split"]
    if len(split) != 3 or any(x < 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
        raise UserError(
            f"recipe key 'data.split' = {split} must be three non-negative fractions "
            "(train, valid, test) that sum to 1, e.g. [0.9, 0.05, 0.05]."
        )
    _check_choice(d["on_invalid_utf8"], ("error", "replace"), "data.on_invalid_utf8")
    _check_choice(d["split_by"], SPLIT_BY, "data.split_by")
    for src in d["sources"]:
        if not src["path"].startswith("builtin:"):
            src["path"] = _abspath(src["path"])

    t = r["tokenizer"]
    _check_choice(t["model_type"], ("unigram", "bpe"), "tokenizer.model_type")
    if t["model"] is not None:
        t["model"] = _abspath(t["model"])

    q = r["retrieval"]
    for i, split in enumerate(q["query_splits"]):
        _check_choice(split, ("train", "valid", "test"), f"retrieval.query_splits[{i}]")
    for i, src in enumerate(q["extra_sources"]):
        if not src["path"].startswith("builtin:"):
            src["path"] = _abspath(src["path"])
    if not 0.0 <= q["validate_fraction"] <= 1.0:
        raise UserError("recipe key 'retrieval.validate_fraction' must be between 0 and 1.")
    if q["k_query"] < r["model"]["num_neighbors"]:
        raise UserError(
            f"retrieval.k_query ({q['k_query']}) must be at least model.num_neighbors "
            f"({r['model']['num_neighbors']}): candidates are filtered down to the neighbours kept."
        )
    c = q["num_candidates"]
    if c is not None and not r["model"]["num_neighbors"] <= c <= q["k_query"]:
        raise UserError(
            f"retrieval.num_candidates ({c}) must be between model.num_neighbors ({r['model']['num_neighbors']}) "
            f"and retrieval.k_query ({q['k_query']}): samples keep num_neighbors of the candidates stored."
        )

    m = r["model"]
    _check_choice(m["arch"], ("retro", "gpt"), "model.arch")
    if m["chunk_length"] < 1 or m["seq_length"] % m["chunk_length"]:
        raise UserError(
            f"model.seq_length ({m['seq_length']}) must be a multiple of model.chunk_length "
            f"({m['chunk_length']}): Retro splits every sample into whole chunks."
        )

    _check_model_layout(m)
    _check_training(r)
    _check_instruct(r)
    _check_export(r, r["stages"])
    r["workdir"] = _abspath(r["workdir"])


def _check_model_layout(m: dict[str, Any]) -> None:
    _check_choice(m["flavor"], MODEL_FLAVORS, "model.flavor")
    _check_choice(m["position_embedding_type"], POSITION_TYPES, "model.position_embedding_type")
    if m["encoder_rotary"] and m["position_embedding_type"] != "rope":
        raise UserError("model.encoder_rotary needs model.position_embedding_type rope (it is "
                        f"'{m['position_embedding_type']}'); set model.encoder_rotary false.")
    r = m["num_retrieved_chunks"] * m["chunk_length"]
    if m["position_embedding_type"] == "learned_absolute" and m["arch"] == "retro" and r > m["seq_length"]:
        raise UserError(
            f"model.position_embedding_type learned_absolute numbers each neighbour's tokens 0..r-1 in the "
            f"decoder's table of model.seq_length ({m['seq_length']}) positions, so r = num_retrieved_chunks * "
            f"chunk_length ({r}) must not exceed it. Lower model.num_retrieved_chunks or raise model.seq_length.")
    """Shape checks a job would otherwise hit only after it queued for hours."""
    from retro_toolkit.core.cca import default_cca_layers

    n = m["num_layers"]
    if m["arch"] == "retro":
        cca = m["cca_layers"] if m["cca_layers"] is not None else default_cca_layers(n)
        if not cca:
            raise UserError(
                f"model.num_layers is {n}: Retro's rule puts chunked cross-attention in layers 6, 9, ... so a "
                "model this shallow has none. Set model.cca_layers to an explicit list, e.g. [2].")
        outside = [x for x in cca if not 1 <= x <= n]
        if outside:
            raise UserError(f"model.cca_layers {cca} names layers outside 1..{n} (model.num_layers; 1-based).")
    if m["hidden_size"] % m["num_attention_heads"]:
        raise UserError(f"model.hidden_size ({m['hidden_size']}) must be a multiple of model.num_attention_heads "
                        f"({m['num_attention_heads']}).")
    tp = m["tensor_model_parallel_size"]
    for key in ("num_attention_heads", "ffn_hidden_size"):
        if m[key] % tp:
            raise UserError(f"model.{key} ({m[key]}) must be a multiple of model.tensor_model_parallel_size ({tp}): "
                            "tensor parallelism splits it evenly over the ranks.")


def _check_optimizer(p: dict[str, Any], sec: str) -> None:
    """The optimizer, schedule and batch keys pretrain and sft share."""
    for key in ("weight_decay", "clip_grad", "min_lr"):
        if p[key] < 0:
            raise UserError(f"recipe key '{sec}.{key}' must not be negative (got {p[key]}).")
    if p["global_batch_size"] % p["micro_batch_size"]:
        raise UserError(
            f"{sec}.global_batch_size ({p['global_batch_size']}) must be a multiple of "
            f"{sec}.micro_batch_size ({p['micro_batch_size']}) times the data-parallel ranks."
        )
    if p["min_lr"] > p["lr"]:
        raise UserError(f"{sec}.min_lr ({p['min_lr']}) is above {sec}.lr ({p['lr']}).")
    _check_choice(p["lr_decay_style"], ("cosine", "linear", "constant"), f"{sec}.lr_decay_style")
    decay = p["lr_decay_iters"] or p["train_iters"]
    if p["lr_warmup_iters"] >= decay:
        raise UserError(
            f"{sec}.lr_warmup_iters ({p['lr_warmup_iters']}) must be below the decay length "
            f"({decay}: {sec}.lr_decay_iters, or {sec}.train_iters when that is null)."
        )


def _check_data_file(path: str, key: str) -> str:
    if path.startswith("builtin:"):
        from retro_toolkit.data import BUILTIN_FILES

        if path not in BUILTIN_FILES:
            raise UserError(f"recipe key '{key}' = {path!r} is not a bundled file; bundled: {', '.join(BUILTIN_FILES)}.")
        return path
    path = _abspath(path)
    if not Path(path).is_file():
        raise UserError(f"recipe key '{key}' points to {path}, which does not exist or is not a file.")
    return path


def _check_instruct(r: dict[str, Any]) -> None:
    from retro_toolkit.collections.instruct.readers import FORMATS
    from retro_toolkit.collections.qa.tasks import TASKS

    s, m = r["sft"], r["model"]
    stages = r["stages"]
    if "sft" in stages:
        _check_optimizer(s, "sft")
        if not s["datasets"]:
            raise UserError("recipe key 'sft.datasets' is empty: list at least one {name, path, format, weight}.")
        for i, d in enumerate(s["datasets"]):
            _check_choice(d["format"], FORMATS, f"sft.datasets[{i}].format")
            if d["weight"] < 0:
                raise UserError(f"recipe key 'sft.datasets[{i}].weight' must not be negative (got {d['weight']}).")
            d["path"] = _check_data_file(d["path"], f"sft.datasets[{i}].path")
        if not sum(d["weight"] for d in s["datasets"]) > 0:
            raise UserError("the weights of sft.datasets sum to 0: give at least one dataset a positive weight.")
        if s["seq_length"] is not None and (s["seq_length"] < 1 or s["seq_length"] % m["chunk_length"]):
            raise UserError(f"recipe key 'sft.seq_length' ({s['seq_length']}) must be a positive multiple of "
                            f"model.chunk_length ({m['chunk_length']}).")
        if s["init_from"]:
            s["init_from"] = _abspath(s["init_from"])
            if not Path(s["init_from"]).exists():
                raise UserError(f"recipe key 'sft.init_from' points to {s['init_from']}, which does not exist.")
    q = r["eval_qa"]
    if "eval_qa" in stages:
        if not q["tasks"]:
            raise UserError("recipe key 'eval_qa.tasks' is empty: list at least one {name, path}.")
        for i, t in enumerate(q["tasks"]):
            _check_choice(t["name"], tuple(TASKS), f"eval_qa.tasks[{i}].name")
            t["path"] = _check_data_file(t["path"], f"eval_qa.tasks[{i}].path")
        _check_choice(q["contexts"], ("ctxs", "retrieve", "none"), "eval_qa.contexts")
        if q["checkpoint"] not in ("sft", "pretrain"):
            q["checkpoint"] = _abspath(q["checkpoint"])
            if not Path(q["checkpoint"]).exists():
                raise UserError(f"recipe key 'eval_qa.checkpoint' points to {q['checkpoint']}, which does not "
                                "exist; use sft, pretrain or a checkpoint folder.")


def _check_export(r: dict[str, Any], stages: list[str]) -> None:
    e = r["export"]
    if "export" not in stages:
        return
    _check_choice(e["weights"], ("file", "dist"), "export.weights")
    if e["name"] is not None and (not e["name"] or "/" in e["name"] or e["name"].startswith(".")):
        raise UserError(f"recipe key 'export.name' ({e['name']!r}) must be a plain file name (no '/', not hidden).")
    if e["checkpoint"] == "sft" and "sft" not in stages:
        raise UserError("recipe key 'export.checkpoint' is sft but the recipe does not run the sft stage: "
                        "use auto or pretrain, or add sft to 'stages'.")
    if e["checkpoint"] not in ("auto", "sft", "pretrain"):
        e["checkpoint"] = _abspath(e["checkpoint"])
        if not Path(e["checkpoint"]).exists():
            raise UserError(f"recipe key 'export.checkpoint' points to {e['checkpoint']}, which does not exist; "
                            "use auto, sft, pretrain or a checkpoint folder.")


def _check_training(r: dict[str, Any]) -> None:
    p, m = r["pretrain"], r["model"]
    _check_optimizer(p, "pretrain")
    for key in ("freeze_decoder", "gpt_twin"):
        if p[key] and m["arch"] != "retro":
            raise UserError(f"pretrain.{key} needs model.arch retro (it is '{m['arch']}').")
    if p["retrieval_lr_mult"] <= 0:
        raise UserError(f"recipe key 'pretrain.retrieval_lr_mult' must be positive (got {p['retrieval_lr_mult']}).")
    if p["retrieval_lr_mult"] != 1.0 and m["arch"] != "retro":
        raise UserError(f"pretrain.retrieval_lr_mult needs model.arch retro (it is '{m['arch']}').")
    if p["freeze_decoder"] and not p["init_from"]:
        raise UserError(
            "pretrain.freeze_decoder trains only chunked cross-attention and the encoder, so the decoder "
            "must come from somewhere: set pretrain.init_from to a GPT checkpoint."
        )
    if p["init_from"]:
        p["init_from"] = _abspath(p["init_from"])
        if not Path(p["init_from"]).exists():
            raise UserError(
                f"recipe key 'pretrain.init_from' points to {p['init_from']}, which does not exist. Give a "
                "checkpoints/<stage> folder (with its 'latest' file) or one iter_NNNNNNN folder."
            )
    w = p["source_weights"]
    if w is not None:
        n = len(r["data"]["sources"])
        if len(w) != n or any(x < 0 for x in w) or not sum(w) > 0:
            raise UserError(
                f"pretrain.source_weights = {w} must give one non-negative weight per data.sources entry "
                f"({n}), not all zero; or null to sample the train stream uniformly."
            )
    e = r["eval_ppl"]
    if not e["splits"]:
        raise UserError("recipe key 'eval_ppl.splits' is empty: list at least one split, e.g. [valid].")
    for i, split in enumerate(e["splits"]):
        _check_choice(split, ("train", "valid", "test"), f"eval_ppl.splits[{i}]")


def _check_executor(raw: Any, checker: _Checker) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"recipe key 'executor' must be a mapping with a 'type' ({', '.join(EXECUTOR_SCHEMAS)}).")
    etype = raw.get("type", "local")
    if etype not in EXECUTOR_SCHEMAS:
        _check_choice(str(etype), tuple(EXECUTOR_SCHEMAS), "executor.type")
    own = {f.name for f in dataclasses.fields(EXECUTOR_SCHEMAS[etype])}
    for key in raw:
        owners = [t for t, cls in EXECUTOR_SCHEMAS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if key not in own and owners:
            raise UserError(
                f"recipe key 'executor.{key}' does not apply to the {etype} executor; it belongs to "
                f"{' and '.join(owners)}. Select one with executor={owners[0]}."
            )
    out = checker.check_dataclass(raw, EXECUTOR_SCHEMAS[etype], "executor")
    out["stages"] = _check_stage_overrides(out["stages"], etype, checker)
    return out


def _check_stage_overrides(stages: dict[str, Any], etype: str, checker: _Checker) -> dict[str, Any]:
    cls = EXECUTOR_SCHEMAS[etype]
    hints = typing.get_type_hints(cls)
    settable = [f.name for f in dataclasses.fields(cls) if f.name not in NOT_PER_STAGE]
    out = {}
    for stage, override in stages.items():
        where = f"executor.stages.{stage}"
        if stage not in STAGE_NAMES:
            hint = difflib.get_close_matches(stage, STAGE_NAMES, n=1)
            raise UserError(f"recipe key '{where}' names no stage." + (f" Did you mean '{hint[0]}'?" if hint else "")
                            + f" Stages: {', '.join(STAGE_NAMES)}.")
        if override is None:
            override = {}
        if not isinstance(override, dict):
            raise UserError(f"recipe key '{where}' must be a mapping of {etype} executor keys, e.g. "
                            f"{{{settable[0]}: ...}}; got {override!r}.")
        for key, value in override.items():
            if key not in settable:
                near = [k for k in settable if k.startswith(str(key))][:1] or difflib.get_close_matches(
                    str(key), settable, n=1)
                why = " (one setting for every stage)" if key in NOT_PER_STAGE else ""
                raise UserError(f"recipe key '{where}.{key}' cannot be set per stage{why}."
                                + (f" Did you mean '{where}.{near[0]}'?" if near else "")
                                + f" Keys a stage can set: {', '.join(settable)}.")
        out[stage] = {k: checker.check(v, hints[k], f"{where}.{k}") for k, v in override.items()}
    return out


def _check_parallel(r: dict[str, Any]) -> None:
    """Each model stage's process count fits the TP size and the batch (before any job is queued)."""
    tp = r["model"]["tensor_model_parallel_size"]
    executor = OmegaConf.create(r["executor"])
    for stage in MODEL_PARALLEL_STAGES:
        if stage not in r["stages"]:
            continue
        n = processes(for_stage(executor, stage))
        if n % tp:
            raise UserError(
                f"stage '{stage}' starts {n} process(es) (executor settings, with executor.stages.{stage}), "
                f"which model.tensor_model_parallel_size = {tp} does not divide. Give it a multiple of {tp}."
            )
        if stage in ("pretrain", "sft"):
            s, dp = r[stage], n // tp
            if s["global_batch_size"] % (s["micro_batch_size"] * dp):
                raise UserError(
                    f"{stage}.global_batch_size ({s['global_batch_size']}) must be a multiple of "
                    f"{stage}.micro_batch_size ({s['micro_batch_size']}) x data-parallel ranks ({dp} = {n} "
                    f"processes / tensor parallel {tp}) = {s['micro_batch_size'] * dp}."
                )


def validate(cfg: DictConfig, recipe_file: Path | None = None) -> DictConfig:
    """Return the checked, resolved recipe (read-only); raise UserError on the first problem."""
    # Before merging onto the schema's defaults: OmegaConf keeps a default over a merged '???'.
    unset = _unset_keys(OmegaConf.to_container(cfg, resolve=False))
    if len(unset) == 1:
        raise UserError(f"recipe key '{unset[0]}' is required but not set. Set it in the recipe or as {unset[0]}=...")
    if unset:
        raise UserError(f"recipe keys required but not set: {', '.join(unset)}. Set them in the recipe "
                        "or as key=value overrides.")
    resolved = _resolve(cfg)
    executor = resolved.pop("executor", {"type": "local"})
    checker = _Checker(Recipe)
    checked = checker.check_dataclass(resolved, Recipe, "")
    checked["executor"] = _check_executor(executor, checker)
    _check_ranges(checked, stages=tuple(checked["stages"]))
    _semantic(checked)
    _check_parallel(checked)
    out = OmegaConf.create(checked)
    OmegaConf.set_readonly(out, True)
    return out
