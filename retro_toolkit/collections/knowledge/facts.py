"""Facts about invented people, for showing a retrieval database updated without retraining.

Each person has a name, a descriptor (adjective and occupation), a home town and a
favourite colour. Every fact is stated in a few short
documents, each with a different sentence template, so the document a query retrieves is
another one stating the same fact (Retro never retrieves from the query's own document).
The update changes some facts: their v1 documents leave the database and v2 documents
(same templates, new value) come in, with documents about people who appear only there.

    python -m retro_toolkit.collections.knowledge.facts OUTDIR [--entities 2400] [--seed 0] [--tokenizer M]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

# Names and descriptors from real words: the MiniLM embedder tells one person's chunks from
# another's by them only when they carry meaning (invented syllables lose to the template
# wording), and every document opens with the whole identity, so the first chunk is mostly it.
FIRST = ("Agnes Albert Alma Ambrose Arthur Beatrix Bernard Bertram Cecil Clara Cornelius Dorothy Edgar Edith "
         "Edmund Elspeth Esther Felix Florence Gideon Greta Harriet Horace Ida Ignatius Imogen Jasper Josephine "
         "Leopold Lucinda Mabel Magnus Matilda Mortimer Nell Octavia Oswald Percival Philippa Quentin Rosalind "
         "Rufus Silas Sybil Tabitha Theodora Ulric Ursula Victor Wilfred Winifred Zachary Hector Iris Juno Lionel "
         "Maud Nigel Opal Perpetua").split()
SURNAME_HEADS = ("thistle copper raven moss briar frost ember willow hazel bramble fern amber lantern kettle feather "
                 "thorn marble pepper cinder bell heron otter badger falcon juniper saffron tallow velvet walnut acorn").split()
SURNAME_TAILS = "wood field brook stone worth well more ridge gate hollow cote wick by ford shaw ley dale mere croft bury".split()
ADJECTIVES = ("left-handed red-haired soft-spoken cheerful stubborn absent-minded bearded tall freckled shy grumpy "
              "patient cautious famous retired young elderly clever restless gentle").split()
OCCUPATIONS = ("baker blacksmith beekeeper cartographer clockmaker ferryman glassblower harpist jeweller locksmith "
               "miller potter saddler shepherd tailor tanner weaver violinist astronomer botanist chemist falconer "
               "fisherman gardener herbalist innkeeper mason printer sculptor").split()

TOWNS = ["Ashbury", "Brindlemoor", "Calderwick", "Dunmarrow", "Elmshade", "Fallowmere", "Glenhollow",
         "Harrowgate", "Ivybridge", "Juniper Falls", "Kestrel Bay", "Larkspur", "Millbrook", "Northwold",
         "Oakhaven", "Pebblecombe", "Quarry Hill", "Redmarsh", "Saltcliff", "Thornfield", "Umberlee",
         "Valemont", "Willowdene", "Yarrowby", "Stonemere", "Copperton", "Driftwood", "Emberly",
         "Foxmoor", "Greystock", "Hollowmere", "Irongate"]
COLOURS = ["crimson", "amber", "teal", "violet", "olive", "scarlet", "indigo", "maroon", "turquoise",
           "lavender", "ochre", "cobalt", "silver", "emerald", "magenta", "beige"]
VALUES = {"town": TOWNS, "colour": COLOURS}

# A template is an opening (after the identity) and a statement; openings hint at the
# attribute, so a probe's first chunk retrieves the right fact of its person, not another.
# The value lands 16-30 tokens in: in the chunk after the one that names the person, and
# inside a retrieved first chunk's continuation (the next 16 tokens).
OPENINGS = {
    "town": ["who rarely visits the old neighbourhood", "who still misses the streets of childhood",
             "who moved away from home long ago", "who often writes to family back home",
             "who tells stories about the old town", "who keeps a photo of the town square",
             "who goes home for every holiday", "who knows every lane of the home town"],
    "colour": ["who has a good eye for paint", "who owns far too many scarves", "who dyes wool as a hobby",
               "who cares a lot about colours", "who repaints the front door every spring",
               "who chooses clothes with great care", "who sells paint at the market", "who sorts everything by colour"],
}
STATEMENTS = {
    "town": ["grew up in the town of {v}", "calls the town of {v} home", "was born and raised in {v}",
             "comes from the town of {v}", "spent a childhood in {v}"],
    "colour": ["has a favourite colour, and it is {v}", "always wears the colour {v}", "paints everything the colour {v}",
               "loves the colour {v} above all", "picks the colour {v} every time"],
}
TEMPLATES = {a: [f"{{n}}, the {{d}}, {o}. {{f}} {s}." for o in OPENINGS[a] for s in STATEMENTS[a]] for a in OPENINGS}


@dataclass
class Fact:
    entity: str
    descriptor: str  # adjective and occupation, the same in all its person's documents
    attribute: str
    v1: Optional[str]  # None for people who appear only in the update
    v2: Optional[str]  # None for facts the update leaves alone
    templates: list[int]  # the templates of its corpus documents
    probe_template: int  # a template none of its documents use

    @property
    def kind(self) -> str:
        return "new" if self.v1 is None else "changed" if self.v2 is not None else "unchanged"


def render(attribute: str, template: int, entity: str, descriptor: str, value: str) -> str:
    return TEMPLATES[attribute][template].format(n=entity, d=descriptor, f=entity.split()[0], v=value)


def prompt_of(attribute: str, template: int, entity: str, descriptor: str) -> str:
    """The document up to its value, without the space before it."""
    return TEMPLATES[attribute][template].split("{v}")[0].format(n=entity, d=descriptor, f=entity.split()[0]).rstrip()


class FactWorld:
    def __init__(self, entities: int = 2400, changed: int = 300, unchanged: int = 300, new: int = 150,
                 mentions: int = 3, seed: int = 0) -> None:
        """`new` people appear only in the update; `changed` + `unchanged` known facts are probed."""
        rng = random.Random(seed)
        names: set[str] = set()
        while len(names) < entities + new:
            names.add(f"{rng.choice(FIRST)} {rng.choice(SURNAME_HEADS).capitalize()}{rng.choice(SURNAME_TAILS)}")
        people = sorted(names)
        rng.shuffle(people)
        self.facts: list[Fact] = []
        for i, person in enumerate(people):
            descriptor = f"{rng.choice(ADJECTIVES)} {rng.choice(OCCUPATIONS)}"
            for attribute, values in VALUES.items():
                tpl = rng.sample(range(len(TEMPLATES[attribute])), mentions + 1)
                v = rng.choice(values)
                old = None if i >= entities else v
                self.facts.append(Fact(person, descriptor, attribute, old, v if old is None else None, tpl[:mentions], tpl[mentions]))
        known = [f for f in self.facts if f.v1 is not None]
        picked = rng.sample(known, changed + unchanged)
        for f in picked[:changed]:
            f.v2 = rng.choice([v for v in VALUES[f.attribute] if v != f.v1])
        self.probed = picked + [f for f in self.facts if f.v1 is None]

    def _docs(self, facts: Iterable[Fact], version: str) -> list[str]:
        return [render(f.attribute, t, f.entity, f.descriptor, getattr(f, version)) for f in facts for t in f.templates]

    def v1_documents(self) -> list[str]:
        """The training corpus and database v1, in a fixed shuffled order."""
        docs = self._docs([f for f in self.facts if f.v1 is not None], "v1")
        random.Random(1).shuffle(docs)
        return docs

    def removed_documents(self) -> list[str]:
        return self._docs([f for f in self.facts if f.kind == "changed"], "v1")

    def added_documents(self) -> list[str]:
        """The changed facts' new documents and everything about people new in v2."""
        return self._docs([f for f in self.facts if f.kind in ("changed", "new")], "v2")

    def v2_documents(self) -> list[str]:
        removed = set(self.removed_documents())
        return [d for d in self.v1_documents() if d not in removed] + self.added_documents()

    def probes(self) -> list[dict]:
        return [{"prompt": prompt_of(f.attribute, f.probe_template, f.entity, f.descriptor), "v1": f.v1, "v2": f.v2,
                 "kind": f.kind, "entity": f.entity, "attribute": f.attribute} for f in self.probed]

    def heldout_documents(self, kind: str = "new") -> list[dict]:
        """Whole probe-template documents, never in any corpus: for `new` people their value is
        only in database v2; for `unchanged` facts it is in both."""
        out = []
        for f in self.probed:
            if f.kind == kind:
                value = f.v2 if f.v1 is None else f.v1
                out.append({"text": render(f.attribute, f.probe_template, f.entity, f.descriptor, value),
                            "prompt": prompt_of(f.attribute, f.probe_template, f.entity, f.descriptor), "value": value})
        return out


# Neutral words appended after the statement: with them a document and its end-of-document
# token fill whole chunks, so every document starts a chunk in the token stream, as a probe
# does, and training sees the probe's layout (name in one chunk, value in the next).
_TAIL = "and so it is with many of the old stories for a long time and still is".split()


def pad_to_chunks(docs: list[str], encode: Callable[[str], list[int]], chunk_length: int = 16) -> list[str]:
    """Each document with the fewest tail words that make its tokens + 1 a multiple of chunk_length."""
    out = []
    for doc in docs:
        for k in range(2 * len(_TAIL) + 1):
            text = doc if k == 0 else f"{doc} {' '.join((_TAIL * 2)[:k])}."
            if (len(encode(text)) + 1) % chunk_length == 0:
                break
        out.append(text)
    return out


def _write(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
            n += 1
    return n


def write_all(outdir: str | Path, encode: Optional[Callable[[str], list[int]]] = None, **world: int) -> dict:
    """v1.jsonl (train corpus), v2.jsonl (database v2), removed/added/probes/heldout_*.jsonl, and
    corpus_v1.jsonl: v1 then the held-out unchanged and new documents, to be split
    [train, valid, test] by document count (printed as `split`). With `encode` (the decoder's
    tokenizer) every document is padded to whole chunks."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    w = FactWorld(**world)
    pad = (lambda docs: pad_to_chunks(docs, encode)) if encode else (lambda docs: docs)  # noqa: E731
    texts = lambda docs: ({"text": d} for d in pad(docs))  # noqa: E731
    v1, unchanged, new = w.v1_documents(), w.heldout_documents("unchanged"), w.heldout_documents("new")
    for held in (unchanged, new):
        for d, text in zip(held, pad([d["text"] for d in held])):
            d["text"] = text
    total = len(v1) + len(unchanged) + len(new)
    return {
        "corpus_v1": _write(out / "corpus_v1.jsonl", texts(v1 + [d["text"] for d in unchanged + new])),
        "split": [len(v1) / total, len(unchanged) / total, len(new) / total],
        "v1": _write(out / "v1.jsonl", texts(v1)),
        "v2": _write(out / "v2.jsonl", texts(w.v2_documents())),
        "removed": _write(out / "removed.jsonl", texts(w.removed_documents())),
        "added": _write(out / "added.jsonl", texts(w.added_documents())),
        "probes": _write(out / "probes.jsonl", w.probes()),
        "heldout_new": _write(out / "heldout_new.jsonl", new),
        "heldout_unchanged": _write(out / "heldout_unchanged.jsonl", unchanged),
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write the invented-facts corpora (v1, v2) and their probes.")
    p.add_argument("outdir")
    p.add_argument("--entities", type=int, default=2400)
    p.add_argument("--changed", type=int, default=300)
    p.add_argument("--unchanged", type=int, default=300)
    p.add_argument("--new", type=int, default=150)
    p.add_argument("--mentions", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a SentencePiece .model: pad every document to whole 16-token chunks")
    a = p.parse_args(argv)
    encode = None
    if a.tokenizer:
        import sentencepiece as spm

        encode = spm.SentencePieceProcessor(model_file=a.tokenizer).encode
    counts = write_all(a.outdir, encode, entities=a.entities, changed=a.changed, unchanged=a.unchanged, new=a.new,
                       mentions=a.mentions, seed=a.seed)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
