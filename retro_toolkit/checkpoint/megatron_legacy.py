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

import os
from pathlib import Path
from typing import Any, Callable

from retro_toolkit.checkpoint.megatron_args import chunk_length, read_retro_args, section_from_args
from retro_toolkit.checkpoint.megatron_files import iteration_folder, load_shard, shard_files
from retro_toolkit.checkpoint.megatron_legacy_names import rename
from retro_toolkit.checkpoint.megatron_legacy_shards import flatten, merge_shards
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


def import_checkpoint(folder: str | os.PathLike, tokenizer_file: str | os.PathLike, out: str | os.PathLike,
                      trust: bool = False, weights: str = "file", log: Callable[[str], None] = print,
                      retro_args: str | os.PathLike | None = None) -> Path:
    """Write `out` (.nemo) from a Megatron-LM checkpoint folder (legacy or megatron-core
    torch_dist) and its tokenizer (a SentencePiece .model, a tokenizer.json or its folder). `retro_args`: the Retro workdir's args.json, whose
    settings (the chunk length) complete the checkpoint's args."""
    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.checkpoint.gpt_sources import check_vocabulary
    from retro_toolkit.checkpoint.mapped import dtype_of
    from retro_toolkit.checkpoint.nemo import build_for, load_full
    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    folder, tokenizer_file = Path(folder), Path(tokenizer_file)
    tokenizer = open_tokenizer(tokenizer_file, "--tokenizer")
    args, section, ours, kind = read_megatron(folder, trust, read_retro_args(retro_args) if retro_args else {})
    if section["arch"] == "retro" and chunk_length(args) is None:
        log(f"import-megatron: the checkpoint's args do not record the chunk length (legacy Megatron-LM read it "
            f"from {args.get('retro_workdir') or '<retro_workdir>'}/args.json); taking Retro's 64. If the run used "
            "another, pass that file as --retro-args.")
    check_vocabulary(tokenizer, section, "--tokenizer")
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
    return write_model(model, section, tokenizer, Path(out), retrieval, weights)


def read_megatron(folder: Path, trust: bool = False, extra: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """(args completed by `extra`, model section, unsharded tensors under our names, what was read)
    of a Megatron-LM checkpoint folder, legacy or megatron-core torch_dist."""
    extra = extra or {}
    sub = iteration_folder(folder)
    if (sub / "metadata.json").is_file():
        from retro_toolkit.checkpoint import megatron_core

        args, ours = megatron_core.read_dist(sub, trust)
        args = {**args, **extra}
        section = section_from_args(args, sub)
        if section["arch"] == "retro":  # megatron-core's RetroModel; its GPTModel has the final norm
            section["flavor"] = megatron_core.FLAVOR
        return args, section, ours, "megatron-core dist checkpoint"
    args, section, ours = _read_legacy(sub, trust, extra)
    return args, section, ours, f"{int(args.get('tensor_model_parallel_size') or 1)} tensor-parallel shard(s)"


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
