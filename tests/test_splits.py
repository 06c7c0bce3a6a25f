"""data.split_by: whole documents, or passages of documents dealt to train/valid/test."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from retro_toolkit.collections.text.splits import Splitter, cut_passages, interleaved_labels
from tests.conftest import CORPUS_ONLY, SMOKE, retro_run


def _doc(rng: random.Random, d: int, paragraphs: int) -> str:
    return "\n\n".join(
        f"doc{d}par{p} " + " ".join(rng.choice(["red", "green", "blue", "stone", "river"]) for _ in range(rng.randint(20, 80)))
        for p in range(paragraphs)
    )


def test_passages_cut_at_blank_lines_and_keep_every_paragraph():
    rng = random.Random(3)
    text = _doc(rng, 0, 30)
    passages = cut_passages(text, 600)
    assert len(passages) > 3
    assert all(len(p) >= 600 for p in passages[:-1])
    assert all(re.match(r"doc0par\d+ ", p) for p in passages)  # each starts at a paragraph
    assert "\n\n".join(passages) == text  # nothing dropped, nothing reordered
    assert cut_passages("  one line\nanother line  ", 5) == ["one line\nanother line"]  # single newlines do not cut
    long = "x" * 5000
    assert cut_passages(long, 600) == [long]  # a paragraph is never cut inside
    assert cut_passages("a" * 700 + "\n\n" + "b" * 100, 600) == ["a" * 700 + "\n\n" + "b" * 100]  # short tail joins
    assert cut_passages("a" * 700 + "\n\n" + "b" * 400, 600) == ["a" * 700, "b" * 400]


def test_interleaved_labels_follow_the_fractions_in_every_stretch():
    fr = [0.8, 0.1, 0.1]
    labels = interleaved_labels(2000, fr)
    assert np.array_equal(labels, interleaved_labels(2000, fr))
    for n in (50, 333, 2000):
        counts = np.bincount(labels[:n], minlength=3)
        assert np.all(np.abs(counts - np.array(fr) * n) <= 3), (n, counts)
    gaps = np.diff(np.flatnonzero(labels == 1))
    assert gaps.max() <= 20  # held-out passages are spread through the source, not at its end
    assert list(interleaved_labels(5, [1.0, 0.0, 0.0])) == [0] * 5


def test_splitter_counts_each_source():
    s = Splitter([10, 20], [0.8, 0.1, 0.1])
    assert s.source_counts(0) == [8, 16] and s.source_counts(1) == [1, 2]
    assert [s(i) for i in range(10)] == [0] * 8 + [1, 2]
    p = Splitter([100, 40], [0.8, 0.1, 0.1], "passage")
    assert sum(p.source_counts(0)) + sum(p.source_counts(1)) + sum(p.source_counts(2)) == 140
    assert p(100) == interleaved_labels(40, [0.8, 0.1, 0.1])[0]  # each source starts its own pattern
    labels = [p(i) for i in range(140)]
    assert p.source_counts(1) == [labels[:100].count(1), labels[100:].count(1)]


def test_passage_counts_do_not_depend_on_the_counting_block(monkeypatch):
    whole = Splitter([1000, 37], [0.9, 0.05, 0.05], "passage").counts
    monkeypatch.setattr(Splitter, "_COUNT_BLOCK", 7)
    assert Splitter([1000, 37], [0.9, 0.05, 0.05], "passage").counts == whole


@pytest.fixture(scope="module")
def passage_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("passages")
    rng = random.Random(0)
    with open(d / "docs.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": _doc(rng, i, 12)}) + "\n")
    w = d / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, f"workdir={w}", f"data.sources=[{{path: {d / 'docs.jsonl'}}}]",
                  "data.split=[0.8,0.1,0.1]", "data.split_by=passage", "data.passage_chars=700",
                  "tokenizer.vocab_size=290")
    assert p.returncode == 0, p.stdout + p.stderr
    return w


def test_valid_and_test_are_unseen_passages_of_trained_documents(passage_corpus):
    from retro_toolkit.collections.text.token_stream import TokenStream
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    meta = json.loads((passage_corpus / "corpus" / "meta.json").read_text())
    assert meta["split_by"] == "passage"
    tok = workdir_tokenizer(passage_corpus)
    text = {}
    for split in ("train", "valid", "test"):
        s = TokenStream(passage_corpus / "corpus", split)
        text[split] = [tok.decode(list(s.tokens[a:b - 1])) for a, b in zip(s.doc_offsets, s.doc_offsets[1:])]
        assert meta["splits"][split]["source_documents"] == [len(text[split])]
    n = sum(len(t) for t in text.values())
    assert 40 < n < 100 and 2 <= len(text["valid"]) <= 0.2 * n and 2 <= len(text["test"]) <= 0.2 * n
    train_paragraphs = {m for t in text["train"] for m in re.findall(r"doc\d+par\d+", t)}
    train_docs = {m.split("par")[0] for m in train_paragraphs}
    for split in ("valid", "test"):
        for t in text[split]:
            paragraphs = re.findall(r"doc\d+par\d+", t)
            assert paragraphs and not set(paragraphs) & train_paragraphs  # never trained on
            assert {m.split("par")[0] for m in paragraphs} <= train_docs  # its document's other passages were
    held_out_docs = {m.split("par")[0] for t in text["valid"] + text["test"] for m in re.findall(r"doc\d+par\d+", t)}
    assert len(held_out_docs) >= 3  # spread over documents, not the last document's tail



def test_work_directories_from_before_split_by_stay_current():
    from omegaconf import OmegaConf

    from retro_toolkit.recipe import load_recipe
    from retro_toolkit.runner.manifest import fingerprint

    recipe = load_recipe(SMOKE)
    old = OmegaConf.to_container(recipe)
    del old["data"]["split_by"], old["data"]["passage_chars"]  # a recipe as resolved before the keys existed
    assert fingerprint(OmegaConf.create(old), "prepare_corpus") == fingerprint(recipe, "prepare_corpus")
    passages = OmegaConf.merge(recipe, {"data": {"split_by": "passage"}})
    assert fingerprint(passages, "prepare_corpus") != fingerprint(recipe, "prepare_corpus")
    shorter = OmegaConf.merge(passages, {"data": {"passage_chars": 500}})
    assert fingerprint(shorter, "prepare_corpus") != fingerprint(passages, "prepare_corpus")
