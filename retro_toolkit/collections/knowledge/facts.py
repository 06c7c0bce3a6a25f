"""Facts about invented people, for showing a retrieval database updated without retraining.

Each person has a name, a descriptor (adjective and occupation), a home town and a
favourite colour. Every fact is stated in a few short
documents, each with a different sentence template, so the document a query retrieves is
another one stating the same fact (Retro never retrieves from the query's own document).
The update changes some facts: their v1 documents leave the database and v2 documents
(same templates, new value) come in, with documents about people who appear only there.

    python -m retro_toolkit.collections.knowledge.facts OUTDIR [--entities 4800] [--seed 0] [--chunk-length 16]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

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
ADJECTIVES = ("quiet jolly wise cheerful stubborn careful bearded tall freckled shy grumpy "
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
STREETS = ("Rowan Elder Aspen Alder Birch Cedar Linden Poplar Sycamore Yew Holly Laurel Myrtle Hawthorn Blackthorn "
           "Chestnut Cherry Plum Pear Quince Lark Wren Finch Robin Swallow Magpie Starling Kingfisher Plover Curlew "
           "Bittern Osprey Nightingale Thrush Linnet Siskin Dunnock Ouzel Pipit Bunting").split()

# A template is the statement before the value. Every document is laid out in two chunks:
# the first holds the person (name and descriptor), neutral filler words and the statement,
# exactly one chunk long; the value opens the second. A probe is a first chunk with a
# template none of the person's documents use; the first chunk it retrieves is another
# document's, whose continuation (the next chunk) opens with the value. Copying the value is
# then the aligned copy a small Retro learns within a CPU budget; a value anywhere in the
# continuation needs a lookup by content that takes it many times longer.
TEMPLATES = {
    "town": ["grew up in", "was born in", "comes from", "still lives in", "was raised in", "has a house in",
             "spent a childhood in", "calls home"],
    "colour": ["likes the colour", "always wears", "paints every door", "favours the colour", "picks the colour",
               "dyes the wool", "is fond of", "dresses in"],
}
_FILLER = "so it is said and so say all the good people of the old country".split()
_TAIL = "and so it is with many of the old stories for a long time and still is today".split()


class Layout:
    """Documents of exactly two chunks (the end-of-document token included), the value first
    in the second; `encode` is the decoder's tokenizer."""

    def __init__(self, encode: Callable[[str], list[int]], chunk_length: int = 16) -> None:
        self.encode, self.m = encode, chunk_length

    def head(self, entity: str, descriptor: str, statement: str) -> str:
        """The first chunk: the fewest filler words that make it chunk_length tokens."""
        for k in range(len(_FILLER) + 1):
            text = " ".join([f"{entity}, {descriptor},", *_FILLER[:k], statement])
            if len(self.encode(text)) == self.m:
                return text
        raise ValueError(f"no filler makes {entity!r} / {statement!r} exactly {self.m} tokens long")

    def document(self, head: str, value: str, source: str) -> str:
        """head, the value, its source and tail words up to one token short of two chunks."""
        for k in range(len(_TAIL) + 1):
            text = f"{head} {value}, {' '.join([source, *_TAIL[:k]])}."
            if len(self.encode(text)) == 2 * self.m - 1:
                return text
        raise ValueError(f"no tail makes the document of {head!r} {2 * self.m - 1} tokens long")


@dataclass
class Fact:
    entity: str
    descriptor: str  # adjective, occupation and street, the same in all its person's documents
    attribute: str
    v1: Optional[str]  # None for people who appear only in the update
    v2: Optional[str]  # None for facts the update leaves alone
    templates: list[int]  # the templates of its corpus documents
    probe_template: int  # a template none of its documents use
    sources: dict[str, str]  # per version, who recorded the value: the rest of its second chunk

    @property
    def kind(self) -> str:
        return "new" if self.v1 is None else "changed" if self.v2 is not None else "unchanged"


class FactWorld:
    def __init__(self, entities: int = 4800, changed: int = 300, unchanged: int = 300, new: int = 300,
                 mentions: int = 3, seed: int = 0) -> None:
        """One fact per person (town or colour, alternately), so a person's other documents all
        state it. `new` people appear only in the update; `changed` + `unchanged` known facts
        and the new ones are probed."""
        rng = random.Random(seed)
        names: set[str] = set()
        while len(names) < entities + new:
            names.add(f"{rng.choice(FIRST)} {rng.choice(SURNAME_HEADS).capitalize()}{rng.choice(SURNAME_TAILS)}")
        people = sorted(names)
        rng.shuffle(people)
        attributes = list(VALUES)
        self.facts: list[Fact] = []
        for i, person in enumerate(people):
            descriptor = f"{rng.choice(ADJECTIVES)} {rng.choice(OCCUPATIONS)} of {rng.choice(STREETS)} Lane"
            attribute = attributes[i % len(attributes)]
            tpl = rng.sample(range(len(TEMPLATES[attribute])), mentions + 1)
            v = rng.choice(VALUES[attribute])
            old = None if i >= entities else v
            sources = {version: f"by {rng.choice(FIRST)} {rng.choice(SURNAME_HEADS).capitalize()}"
                                f"{rng.choice(SURNAME_TAILS)}, {rng.randrange(1800, 1900)}"
                       for version in ("v1", "v2")}
            self.facts.append(Fact(person, descriptor, attribute, old, v if old is None else None, tpl[:mentions],
                                   tpl[mentions], sources))
        known = [f for f in self.facts if f.v1 is not None]
        picked = rng.sample(known, changed + unchanged)
        for f in picked[:changed]:
            f.v2 = rng.choice([v for v in VALUES[f.attribute] if v != f.v1])
        self.probed = picked + [f for f in self.facts if f.v1 is None]

    def _docs(self, facts: Iterable[Fact], version: str, layout: Layout) -> list[str]:
        return [layout.document(layout.head(f.entity, f.descriptor, TEMPLATES[f.attribute][t]), getattr(f, version),
                                f.sources[version]) for f in facts for t in f.templates]

    def v1_documents(self, layout: Layout) -> list[str]:
        """The training corpus and database v1, in a fixed shuffled order."""
        docs = self._docs([f for f in self.facts if f.v1 is not None], "v1", layout)
        random.Random(1).shuffle(docs)
        return docs

    def removed_documents(self, layout: Layout) -> list[str]:
        return self._docs([f for f in self.facts if f.kind == "changed"], "v1", layout)

    def added_documents(self, layout: Layout) -> list[str]:
        """The changed facts' new documents and everything about people new in v2."""
        return self._docs([f for f in self.facts if f.kind in ("changed", "new")], "v2", layout)

    def v2_documents(self, layout: Layout) -> list[str]:
        removed = set(self.removed_documents(layout))
        return [d for d in self.v1_documents(layout) if d not in removed] + self.added_documents(layout)

    def probes(self, layout: Layout) -> list[dict]:
        """The first chunk of a document in the fact's probe template, and the values it could go on with."""
        return [{"prompt": layout.head(f.entity, f.descriptor, TEMPLATES[f.attribute][f.probe_template]),
                 "v1": f.v1, "v2": f.v2, "kind": f.kind, "entity": f.entity, "attribute": f.attribute}
                for f in self.probed]

    def heldout_documents(self, layout: Layout, kind: str = "new") -> list[dict]:
        """Whole probe-template documents, never in any corpus: for `new` people their value is
        only in database v2; for `unchanged` facts it is in both."""
        out = []
        for f in self.probed:
            if f.kind == kind:
                version = "v2" if f.v1 is None else "v1"
                prompt = layout.head(f.entity, f.descriptor, TEMPLATES[f.attribute][f.probe_template])
                out.append({"text": layout.document(prompt, getattr(f, version), f.sources[version]), "prompt": prompt,
                            "value": getattr(f, version)})
        return out

    def raw_text(self) -> Iterator[str]:
        """Every sentence shape and word the documents can hold, for training their tokenizer."""
        for f in self.facts:
            for t in range(len(TEMPLATES[f.attribute])):
                value = f.v1 or f.v2
                yield (f"{f.entity}, {f.descriptor}, {' '.join(_FILLER)}, {TEMPLATES[f.attribute][t]} "
                       f"{value}, {f.sources['v1']} {f.sources['v2']} {' '.join(_TAIL)}.")


def _write(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
            n += 1
    return n


TOKENIZER = "tokenizer.model"


def train_tokenizer(world: FactWorld, out_file: Path, vocab_size: int = 1500) -> Callable[[str], list[int]]:
    """A SentencePiece model of the world's words (one thread, so the same world gives the same model)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    with open(out_file, "wb") as fh:
        spm.SentencePieceTrainer.train(
            sentence_iterator=world.raw_text(), model_writer=fh, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(out_file)).encode


def write_all(outdir: str | Path, encode: Optional[Callable[[str], list[int]]] = None, chunk_length: int = 16,
              vocab_size: int = 1500, **world: int) -> dict:
    """corpus_v1.jsonl (the v1 documents, then the held-out unchanged and new documents, to be
    split [train, valid, test] by document count, printed as `split`), v2.jsonl (database v2),
    removed.jsonl, added.jsonl, probes.jsonl, heldout_*.jsonl, and the tokenizer the layout was
    made with (tokenizer.model; `encode` replaces it)."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    w = FactWorld(**world)
    if encode is None:
        encode = train_tokenizer(w, out / TOKENIZER, vocab_size)
    lay = Layout(encode, chunk_length)
    texts = lambda docs: ({"text": d} for d in docs)  # noqa: E731
    v1, unchanged, new = w.v1_documents(lay), w.heldout_documents(lay, "unchanged"), w.heldout_documents(lay, "new")
    total = len(v1) + len(unchanged) + len(new)
    return {
        "corpus_v1": _write(out / "corpus_v1.jsonl", texts(v1 + [d["text"] for d in unchanged + new])),
        "split": [len(v1) / total, len(unchanged) / total, len(new) / total],
        "v1": _write(out / "v1.jsonl", texts(v1)),
        "v2": _write(out / "v2.jsonl", texts(w.v2_documents(lay))),
        "removed": _write(out / "removed.jsonl", texts(w.removed_documents(lay))),
        "added": _write(out / "added.jsonl", texts(w.added_documents(lay))),
        "probes": _write(out / "probes.jsonl", w.probes(lay)),
        "heldout_new": _write(out / "heldout_new.jsonl", new),
        "heldout_unchanged": _write(out / "heldout_unchanged.jsonl", unchanged),
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write the invented-facts corpora (v1, v2), their probes and their tokenizer.")
    p.add_argument("outdir")
    p.add_argument("--entities", type=int, default=4800)
    p.add_argument("--changed", type=int, default=300)
    p.add_argument("--unchanged", type=int, default=300)
    p.add_argument("--new", type=int, default=300)
    p.add_argument("--mentions", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-length", type=int, default=16)
    a = p.parse_args(argv)
    counts = write_all(a.outdir, chunk_length=a.chunk_length, entities=a.entities, changed=a.changed,
                       unchanged=a.unchanged, new=a.new, mentions=a.mentions, seed=a.seed)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
