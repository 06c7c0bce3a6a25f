"""A trained model ready to generate, from a work directory or one of its checkpoints.

    from retro_toolkit.collections.generate.session import load_session
    s = load_session(checkpoint="runs/smoke/checkpoints/sft")
    print(s.generate(["What does the pass statement do?"], SamplingParams(max_new_tokens=32), chat=True)[0].text)

A checkpoint lives in <workdir>/checkpoints/<stage>/[iter_NNNNNNN]; the work directory
holds the tokenizer and the recipe the model was built from (and, for live retrieval,
the database).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from retro_toolkit.collections.generate.generator import Generation, generate_text
from retro_toolkit.collections.generate.neighbors import FixedNeighbors, LiveRetrieval
from retro_toolkit.collections.generate.sampling import SamplingParams
from retro_toolkit.collections.instruct.dataset import context_neighbors
from retro_toolkit.collections.instruct.format import DEFAULT_SYSTEM, Context, Conversation, encode_prompt
from retro_toolkit.errors import UserError


def _workdir_of(checkpoint: Path) -> Path:
    for parent in [checkpoint, *checkpoint.parents]:
        if parent.name == "checkpoints":
            return parent.parent
    raise UserError(f"{checkpoint} is not inside a work directory's checkpoints/ folder; pass --workdir too.")


@dataclass
class Session:
    model: object
    tokenizer: object
    workdir: Path
    checkpoint: Path
    _retriever: object = None

    def retriever(self):
        if self._retriever is None:
            from retro_toolkit.collections.retrieval.retriever import Retriever

            self._retriever = Retriever(self.workdir)
        return self._retriever

    def generate(self, prompts: Sequence[str], params: SamplingParams, chat: bool = False,
                 contexts: Sequence[str] = (), live_retrieval: bool = False,
                 system: Optional[str] = None) -> list[Generation]:
        """Plain continuation, or (chat) an InstructRetro turn. contexts: every chunk's neighbours (with
        chat, the top-1 goes in the prompt and the rest are neighbours), unless live_retrieval queries
        the database at each chunk."""
        cfg = self.model.config
        k, r = cfg.num_neighbors, cfg.retrieved_length
        ctxs = [Context("", c) for c in contexts]
        convs = [Conversation([("user", p)], contexts=ctxs) for p in prompts]
        ids = ([encode_prompt(c, self.tokenizer, system or DEFAULT_SYSTEM) for c in convs] if chat
               else self.tokenizer.encode(list(prompts)))
        if live_retrieval:
            source = LiveRetrieval(self.retriever(), k)
        else:
            import numpy as np

            # With --chat the top-1 context is in the prompt; otherwise every context goes to the encoder.
            nb = context_neighbors(ctxs[1:] if chat else ctxs, self.tokenizer, k, r)
            source = FixedNeighbors.from_tensor(np.stack([nb] * len(prompts)))
        return generate_text(self.model, self.tokenizer, ids, params, source)


def load_session(checkpoint: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None) -> Session:
    """The model of `checkpoint` (default: the work directory's sft, else pretrain checkpoint), in eval mode."""
    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.pretrain import build
    from retro_toolkit.collections.text.tokenizer import Tokenizer
    from retro_toolkit.collections.text.tokenizer_stage import MODEL_FILE
    from retro_toolkit.recipe import load_recipe

    if checkpoint is None and workdir is None:
        raise UserError("give a checkpoint (--checkpoint) or a work directory (--workdir).")
    if checkpoint is None:
        stages = [Path(workdir) / "checkpoints" / s for s in ("sft", "pretrain")]
        found = [s for s in stages if ckpt.latest(s) is not None]
        if not found:
            raise UserError(f"{workdir} has no finished sft or pretrain checkpoint; run those stages first.")
        checkpoint = found[0]
    checkpoint = Path(checkpoint).resolve()
    wd = Path(workdir).resolve() if workdir is not None else _workdir_of(checkpoint)
    source = ckpt.resolve(checkpoint, "--checkpoint")
    recipe_file = wd / "recipe.resolved.yaml"
    if not recipe_file.is_file():
        raise UserError(f"{wd} has no recipe.resolved.yaml: is it a retro-run work directory?")
    recipe = load_recipe(str(recipe_file))
    arch = ckpt.common_state(source).get("model_section", {}).get("arch", recipe.model.arch)
    model, _, section = build(recipe, arch)
    ckpt.load_model(source, model, section, wd)
    return Session(model.eval(), Tokenizer(wd / MODEL_FILE), wd, source)
