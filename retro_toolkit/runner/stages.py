"""The pipeline's stages: what each depends on, which recipe keys it reads, where its code is.

`config_keys` are the recipe sections whose values go into the stage's fingerprint: a
change to any of them (or to an upstream stage's fingerprint) reruns the stage. Bump
`version` when a stage's output format or semantics change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    depends_on: tuple[str, ...]
    config_keys: tuple[str, ...]
    entry: str | None  # "module:function"; None = not implemented yet
    summary: str
    version: int = 1
    # Stages whose outputs this one reads when the recipe runs them (ordering and fingerprint).
    after: tuple[str, ...] = ()
    # Keys added after work directories existed, with the default that reproduces the old
    # behaviour: at that default they stay out of the fingerprint, so those stay current.
    added_keys: tuple[tuple[str, object], ...] = ()
    # What the stage needs instead of depends_on when model.arch is gpt (no retrieval database).
    gpt_depends_on: tuple[str, ...] = ()

    def needs(self, arch: str) -> tuple[str, ...]:
        """The stages a recipe must list for this one, for a model of `arch`."""
        return self.gpt_depends_on if arch == "gpt" and self.gpt_depends_on else self.depends_on

    def upstream(self, stages) -> tuple[str, ...]:
        """The stages this one waits for in a recipe running `stages`."""
        direct = [d for d in self.depends_on if d in stages] or [d for d in self.gpt_depends_on if d in stages]
        return tuple(direct + [d for d in self.after if d in stages])


# Model keys added after work directories and checkpoints existed, at their old behaviour:
# stages that build the model leave them out of fingerprints and resume checks at that value.
MODEL_ADDED_KEYS: tuple[tuple[str, object], ...] = (("cca_zero_init", False), ("flavor", "megatron_legacy"))
_MODEL_ADDED = tuple((f"model.{k}", v) for k, v in MODEL_ADDED_KEYS)
# The same for pretrain keys.
PRETRAIN_ADDED_KEYS: tuple[tuple[str, object], ...] = (("retrieval_lr_mult", 1.0), ("exit_duration_minutes", None))
# The same for sft keys.
SFT_ADDED_KEYS: tuple[tuple[str, object], ...] = (("exit_duration_minutes", None),)

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "tokenizer",
            (),
            ("tokenizer", "data.sources", "data.on_invalid_utf8"),
            "retro_toolkit.collections.text.tokenizer_stage:run",
            "train (or load) the decoder's SentencePiece tokenizer",
        ),
        StageSpec(
            "prepare_corpus",
            ("tokenizer",),
            ("data",),
            "retro_toolkit.collections.text.prepare_corpus:run",
            "tokenize the corpus into train/valid/test token streams",
            version=2,  # 2: each source split on its own (every split holds every source)
            added_keys=(("data.split_by", "document"), ("data.passage_chars", 2000)),
        ),
        StageSpec(
            "build_db",
            ("prepare_corpus",),
            ("retrieval", "model.chunk_length", "model.num_neighbors"),
            "retro_toolkit.collections.retrieval.build_db:run",
            "chunk DB, BERT embeddings, faiss index, neighbours",
            version=2,  # 2: num_candidates per query chunk, so samples can drop their own documents
        ),
        StageSpec(
            "pretrain",
            ("build_db",),
            ("model", "pretrain", "seed"),
            "retro_toolkit.collections.retro.pretrain:run",
            "pretrain Retro (or its GPT twin); checkpoints, exact resume",
            added_keys=_MODEL_ADDED + tuple((f"pretrain.{k}", v) for k, v in PRETRAIN_ADDED_KEYS),
            gpt_depends_on=("prepare_corpus",),
        ),
        StageSpec(
            "eval_ppl",
            ("pretrain",),
            ("eval_ppl",),
            "retro_toolkit.collections.retro.eval_ppl:run",
            "validation/test perplexity, with and without retrieval",
        ),
        StageSpec(
            "sft",
            ("pretrain",),
            ("model", "sft", "seed"),
            "retro_toolkit.collections.instruct.sft:run",
            "instruction tuning (InstructRetro): answer-only loss, checkpoints, exact resume",
            added_keys=_MODEL_ADDED + tuple((f"sft.{k}", v) for k, v in SFT_ADDED_KEYS),
        ),
        StageSpec(
            "eval_qa",
            ("sft",),
            ("eval_qa", "sft.system_prompt"),
            "retro_toolkit.collections.qa.eval_qa:run",
            "zero-shot QA: generate answers, EM/F1 per task",
        ),
        StageSpec(
            "export",
            ("pretrain",),
            ("model", "export"),
            "retro_toolkit.checkpoint.export:run",
            "package the trained model as export/<name>.nemo (and safetensors)",
            after=("sft",),
            added_keys=_MODEL_ADDED,
        ),
    )
}
