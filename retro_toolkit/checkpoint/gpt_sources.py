"""The GPTs Retro starts from, whatever wrote them: recognise a path and read its decoder.

  FILE.nemo, this toolkit's package        -> "package"
  FILE.nemo, NeMo 1.x megatron_gpt         -> "nemo1"   (nemo1_gpt.py)
  a folder with config.json                -> "hugging_face" (hf_gpt.py: Llama, Mistral, Qwen2, Nemotron)
  a folder with latest_checkpointed_iteration.txt -> "megatron" (megatron_legacy.py: legacy or torch_dist)

`read` gives the model section, the unsharded tensors under this toolkit's names and the
tokenizer where the checkpoint carries one (a Hugging Face folder's tokenizer.json or
tokenizer.model, a package's own); `import_gpt` packages
them (`retro-run import-gpt`), and pretrain.init_from loads them directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from retro_toolkit.errors import UserError

KINDS = ("package", "nemo1", "hugging_face", "megatron")


@dataclass
class GptSource:
    section: dict[str, Any]
    tensors: Mapping[str, Any]  # read lazily where the format allows (mapped.LazyWeights)
    tokenizer: Any  # a collections.text.tokenizer.Tokenizer, when the checkpoint carries one
    kind: str
    # The identities of the same tokenizer in other files it carries (a Hugging Face folder's
    # tokenizer.model beside its tokenizer.json): a work directory made from either matches.
    also_sha256: tuple[str, ...] = ()


def kind_of(path: str | os.PathLike) -> Optional[str]:
    """What `path` holds, or None (e.g. this toolkit's own training checkpoints)."""
    from retro_toolkit.checkpoint.megatron_files import ITERATION_FILE

    p = Path(path)
    if p.is_file() and p.suffix == ".nemo":
        from retro_toolkit.checkpoint.nemo import read_config
        from retro_toolkit.checkpoint.nemo1_gpt import is_nemo1

        return "nemo1" if is_nemo1(read_config(p, ours=False)) else "package"
    if (p / "config.json").is_file():
        return "hugging_face"
    if (p / ITERATION_FILE).is_file():
        return "megatron"
    return None


def read(path: str | os.PathLike, kind: str, trust: bool = False) -> GptSource:
    path = Path(path)
    if kind == "package":
        from retro_toolkit.checkpoint.nemo import read_weights

        return GptSource(*read_weights(path), kind)
    if kind == "nemo1":
        from retro_toolkit.checkpoint.nemo1_gpt import read_nemo1

        from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer

        section, tensors, sp = read_nemo1(path, trust)
        return GptSource(section, tensors, SentencePieceTokenizer.from_bytes(sp, f"{path}:tokenizer"), kind)
    if kind == "hugging_face":
        from retro_toolkit.checkpoint import hf_gpt
        from retro_toolkit.collections.text.tokenizer import HF_FILE, SP_FILE, open_tokenizer

        section = hf_gpt.section_from_config(hf_gpt.read_config(path), path / "config.json")
        tok = open_tokenizer(path) if (path / HF_FILE).is_file() or (path / SP_FILE).is_file() else None
        both = (path / HF_FILE).is_file() and (path / SP_FILE).is_file()
        from retro_toolkit.checkpoint.mapped import DeferredWeights

        readers, dtype = hf_gpt.tensors(path)
        return GptSource(section, DeferredWeights(hf_gpt.rename(readers, section, path), dtype), tok, kind,
                         (open_tokenizer(path / SP_FILE).sha256,) if both else ())
    from retro_toolkit.checkpoint.megatron_legacy import read_megatron

    _, section, tensors, _ = read_megatron(path, trust)
    return GptSource(section, tensors, None, kind)


def import_gpt(src: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
               trust: bool = False, weights: str = "file", log: Callable[[str], None] = print) -> Path:
    """Write `out` (.nemo) from a GPT of any kind `kind_of` recognises; `tokenizer` (a SentencePiece
    .model, a tokenizer.json or its folder) is needed where the checkpoint carries none and replaces
    the one it carries."""
    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.checkpoint.mapped import dtype_of
    from retro_toolkit.checkpoint.nemo import build_for, load_full
    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    kind = kind_of(src)
    if kind is None or kind == "package":
        raise UserError(f"{src} is not a Hugging Face folder (config.json), a NeMo 1.x megatron_gpt .nemo or a "
                        "Megatron-LM checkpoint folder (latest_checkpointed_iteration.txt)"
                        + (": it is already this toolkit's package." if kind else "."))
    source = read(src, kind, trust)
    if source.section.get("arch") != "gpt":
        raise UserError(f"{src} holds a {source.section.get('arch')!r} model; import-gpt reads GPTs "
                        "(import-megatron reads Retro checkpoints).")
    if tokenizer is not None:
        tok = open_tokenizer(tokenizer, "--tokenizer")
    elif source.tokenizer is not None:
        tok = source.tokenizer
    else:
        raise UserError(f"{src} carries no tokenizer: give the model's with --tokenizer (a SentencePiece .model, "
                        "a tokenizer.json, or the folder holding it).")
    check_vocabulary(tok, source.section, "--tokenizer" if tokenizer is not None else str(src))
    s = source.section
    log(f"import-gpt: {kind} GPT, {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads / {s.get('num_query_groups') or s['num_attention_heads']} key-value heads")
    model = build_for(s, tok, 1, dtype_of(source.tensors))
    load_full(model, source.tensors, src)
    package = write_model(model, s, tok, Path(out), None, weights)
    piece = write_model_piece(s, package)
    log(f"import-gpt: {piece} holds the recipe's model section for this decoder: model={piece}")
    return package


def check_vocabulary(tok, section: dict[str, Any], where: str) -> None:
    """A tokenizer whose ids run past the model's embedding rows is not this model's."""
    if tok.vocab_size > section["vocab_size"]:
        raise UserError(f"{where}: the tokenizer {tok.name} has {tok.vocab_size} ids but the model's embedding has "
                        f"{section['vocab_size']} rows: it is not this model's tokenizer. Give the tokenizer the "
                        "model was trained with.")


def write_model_piece(section: dict[str, Any], package: Path) -> Path:
    """<package stem>.model.yaml: a yaml/model piece of a Retro model around this decoder, for
    `retro-run RECIPE model=<it> pretrain.init_from=<package>` (Retro's own keys at their defaults)."""
    import yaml

    from retro_toolkit.checkpoint.nemo import TRAINING_ONLY_KEYS
    from retro_toolkit.recipe.model import DecoderSettings

    decoder = {f: section[f] for f in DecoderSettings.__dataclass_fields__ if f in section}
    # The Retro settings a decoder has too: its positions and which upstream's final norm.
    from_decoder = ("position_embedding_type", "rotary_percent", "rotary_base", "rope_scaling_factor", "flavor")
    piece = {**{k: v for k, v in decoder.items() if k not in TRAINING_ONLY_KEYS}, "arch": "retro",
             **{k: section[k] for k in from_decoder if k in section}}
    path = package.with_name(package.name.removesuffix(".nemo") + ".model.yaml")
    header = (f"# The decoder of {package.name} as a Retro model section (written by retro-run import-gpt).\n"
              "# Retro's own keys (chunk_length, num_neighbors, cca_layers...) take their defaults; set them here.\n")
    path.write_text(header + yaml.safe_dump(piece, sort_keys=False))
    return path
