"""Ask a trained model every fact probe and count which value it answers with.

    from retro_toolkit.collections.knowledge.probes import ask, read_probes
    answers = ask(load_session(checkpoint="runs/ku/checkpoints/pretrain"), read_probes("runs/ku_facts/probes.jsonl"))

A probe is the first chunk of a document stating the fact (facts.py); the model goes on
greedily, and its answer is the value its continuation starts with. A Retro model retrieves
from the work directory's current database as it generates (live retrieval); a GPT answers
from its weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from retro_toolkit.collections.generate.neighbors import LiveRetrieval
from retro_toolkit.collections.generate.generator import generate_text
from retro_toolkit.collections.generate.sampling import SamplingParams

ANSWERS = ("v1", "v2", "other")


def read_probes(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def answer_of(text: str, probe: dict) -> str:
    """Which of the probe's values the continuation starts with: v1, v2 or other."""
    words = text.strip()
    for version in ("v1", "v2"):
        value = probe.get(version)
        if value and (words == value or words.startswith(value) and not words[len(value)].isalnum()):
            return version
    return "other"


def ask(session, probes: Sequence[dict], batch: int = 128, max_new_tokens: int = 4) -> list[dict]:
    """Each probe's continuation, answer (v1/v2/other) and, for Retro, whether the value it
    should answer with now (`expect`, given per probe) is in its retrieved neighbours."""
    out = []
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for lo in range(0, len(probes), batch):
        part = probes[lo:lo + batch]
        ids = [session.prompt_ids(p["prompt"]) for p in part]
        source = LiveRetrieval(session.current_retriever(), session.model.config.num_neighbors) \
            if session.model.has_retrieval else None
        gens = generate_text(session.model, session.tokenizer, ids, params, source)
        retrieved = _neighbour_texts(session, source, len(part)) if source is not None else [None] * len(part)
        for p, g, nb in zip(part, gens, retrieved):
            row = {"text": g.text, "answer": answer_of(g.text, p)}
            if nb is not None and p.get("expect"):
                row["retrieved_expected"] = any(p[p["expect"]] in t and p["entity"] in t for t in nb)
            out.append(row)
    return out


def _neighbour_texts(session, source: LiveRetrieval, rows: int) -> list[list[str]]:
    """The text of the neighbours the probe's first chunk retrieved."""
    retriever = session.current_retriever()
    first = next(ids for chunk, ids in source.log if chunk == 0)
    return [[retriever.chunk_text(int(c), with_continuation=True) for c in first[row]] for row in range(rows)]


def shares(probes: Sequence[dict], answers: Sequence[dict]) -> dict:
    """Per probe kind (changed, unchanged, new): the share of answers with v1, v2 and neither,
    and where recorded, the share whose neighbours held the expected value."""
    out: dict = {}
    for kind in sorted({p["kind"] for p in probes}):
        rows = [a for p, a in zip(probes, answers) if p["kind"] == kind]
        count = Counter(a["answer"] for a in rows)
        out[kind] = {"probes": len(rows), **{v: round(count[v] / len(rows), 4) for v in ANSWERS}}
        hits = [a["retrieved_expected"] for a in rows if "retrieved_expected" in a]
        if hits:
            out[kind]["retrieved_expected"] = round(sum(hits) / len(hits), 4)
    return out
