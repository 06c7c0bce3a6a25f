"""A trained model ready to generate, from a .nemo package, a work directory or a checkpoint.

    from retro_toolkit.collections.generate.session import load_session
    s = load_session(checkpoint="runs/smoke/checkpoints/sft")
    s = load_session(nemo="runs/smoke/export/smoke.nemo")          # or a package
    print(s.generate(["What does the pass statement do?"], SamplingParams(max_new_tokens=32), chat=True)[0].text)

A checkpoint lives in <workdir>/checkpoints/<stage>/[iter_NNNNNNN]; the work directory
holds the tokenizer and the recipe the model was built from (and, for live retrieval,
the database). A package carries its tokenizer; live retrieval then needs a work
directory whose database was built with that tokenizer and chunk length.
"""

from __future__ import annotations

import sys

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
    workdir: Optional[Path]
    checkpoint: Path
    _retriever: object = None

    def retriever(self, reload: bool = False):
        """The work directory's database; reload=True opens it again (after build_db changed it),
        keeping the one open until the new one has opened without error."""
        if self._retriever is None or reload:
            from retro_toolkit.collections.retrieval.retriever import Retriever

            if self.workdir is None:
                raise UserError(f"live retrieval needs a work directory with a retrieval database: pass --workdir "
                                f"(its database must use the tokenizer and chunk length {self.checkpoint} was "
                                "trained with).")
            old = self._retriever
            same_embedder = old is not None and old.recipe.retrieval.embedder == _embedder_of(self.workdir)
            r = Retriever(self.workdir, old.embedder if same_embedder else None)
            cfg = self.model.config
            if (r.chunk_length, r.retrieved_length) != (cfg.chunk_length, cfg.retrieved_length):
                raise UserError(f"{self.workdir}'s database has chunk length {r.chunk_length} and retrieved length "
                                f"{r.retrieved_length}, but the model of {self.checkpoint} was trained with "
                                f"{cfg.chunk_length} and {cfg.retrieved_length}: use a matching work directory.")
            self._retriever = r
        return self._retriever

    def current_retriever(self):
        """The retriever, opened again first when build_db has written another database version
        since (a server calls this between batches). If the new one does not open, the loaded
        one stays and the next call tries again."""
        r = self._retriever
        if r is not None and r.outdated():
            try:
                return self.retriever(reload=True)
            except (UserError, OSError, RuntimeError) as e:
                print(f"the database of {self.workdir} changed but did not open; still serving version "
                      f"{(r.version or {}).get('version')}: {e}", file=sys.stderr, flush=True)
        return self.retriever()

    def generate(self, prompts: Sequence[str], params: SamplingParams, chat: bool = False,
                 contexts: Sequence[str] = (), live_retrieval: bool = False,
                 system: Optional[str] = None) -> list[Generation]:
        """Plain continuation, or (chat) an InstructRetro turn. contexts: every chunk's neighbours (with
        chat, the top-1 goes in the prompt and the rest are neighbours), unless live_retrieval queries
        the database at each chunk."""
        ids = [self.prompt_ids(p, chat, contexts, system) for p in prompts]
        if live_retrieval:
            source = LiveRetrieval(self.retriever(), self.model.config.num_neighbors)
        else:
            import numpy as np

            source = FixedNeighbors.from_tensor(np.stack([self.context_tokens(contexts, chat)] * len(prompts)))
        return generate_text(self.model, self.tokenizer, ids, params, source)

    def prompt_ids(self, prompt: str, chat: bool = False, contexts: Sequence[str] = (),
                   system: Optional[str] = None) -> list[int]:
        """The tokens a prompt goes in as: its text, or (chat) an InstructRetro user turn whose
        prompt holds the top-1 context."""
        if not chat:
            return self.tokenizer.encode([prompt])[0]
        return self.conversation_ids([("user", prompt)], contexts, system)

    def conversation_ids(self, messages: Sequence[tuple[str, str]], contexts: Sequence[str] = (),
                         system: Optional[str] = None) -> list[int]:
        """An InstructRetro conversation (user and assistant turns, from the user, ending with one)
        up to the assistant's next turn."""
        conv = Conversation(list(messages), system=system, contexts=[Context("", c) for c in contexts])
        return encode_prompt(conv, self.tokenizer, DEFAULT_SYSTEM)

    def context_tokens(self, contexts: Sequence[str], chat: bool = False):
        """The neighbour tokens [k, r] that fixed contexts give every chunk (with chat, the
        top-1 context is in the prompt, so the rest)."""
        cfg = self.model.config
        ctxs = [Context("", c) for c in contexts]
        return context_neighbors(ctxs[1:] if chat else ctxs, self.tokenizer, cfg.num_neighbors, cfg.retrieved_length)


def _embedder_of(workdir: Path):
    from retro_toolkit.recipe import load_recipe

    return load_recipe(str(workdir / "recipe.resolved.yaml")).retrieval.embedder


def load_session(checkpoint: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
                 nemo: str | os.PathLike | None = None) -> Session:
    """The model of `nemo` (a package) or `checkpoint` (default: the work directory's sft, else
    pretrain checkpoint), in eval mode."""
    if nemo is not None:
        return _nemo_session(Path(nemo), workdir, checkpoint)
    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.engine import build_trained
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
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
    model, _ = build_trained(recipe, arch, source, wd)
    return Session(model, workdir_tokenizer(wd), wd, source)


def _nemo_session(package: Path, workdir: str | os.PathLike | None, checkpoint) -> Session:
    from retro_toolkit.checkpoint.nemo import restore
    from retro_toolkit.collections.text.tokenizer import TOKENIZER_DIR, workdir_tokenizer

    if checkpoint is not None:
        raise UserError("give either --nemo or --checkpoint, not both.")
    pkg = restore(package)
    wd = None
    if workdir is not None:
        wd = Path(workdir).resolve()
        want = pkg.config["tokenizer"]["sha256"]
        try:
            have = workdir_tokenizer(wd).sha256
        except UserError:
            have = None
        if have != want:
            raise UserError(f"--workdir {wd}: its tokenizer ({wd / TOKENIZER_DIR}) is not the one {package} was trained with "
                            f"(sha256 {want[:12]}), so its database's tokens would mean other text. Use the work "
                            "directory the package was exported from, or one built with that tokenizer.")
    return Session(pkg.model, pkg.tokenizer, wd, package)
