"""The invented-facts corpus for the knowledge-update demonstration: deterministic, laid out in
whole chunks with each value opening a chunk, and its databases, probes and held-out documents
relate as the demonstration needs."""

from __future__ import annotations

import json

import pytest

from retro_toolkit.collections.knowledge import facts
from retro_toolkit.collections.knowledge.probes import answer_of, shares

WORDS = facts.Layout(lambda text: text.split(), 16)  # one token per word


def small(seed: int = 0) -> facts.FactWorld:
    return facts.FactWorld(entities=40, changed=6, unchanged=6, new=4, mentions=3, seed=seed)


def test_the_same_seed_gives_the_same_world_and_another_seed_another():
    assert small().v1_documents(WORDS) == small().v1_documents(WORDS)
    assert small().probes(WORDS) == small().probes(WORDS)
    assert small(1).v1_documents(WORDS) != small().v1_documents(WORDS)


def test_the_update_takes_out_exactly_the_changed_facts_and_adds_their_new_values():
    w = small()
    v1, removed, added, v2 = (w.v1_documents(WORDS), w.removed_documents(WORDS), w.added_documents(WORDS),
                              w.v2_documents(WORDS))
    assert len(v1) == 40 * 3 and len(removed) == 6 * 3 and len(added) == (6 + 4) * 3  # one fact per person
    assert set(removed) <= set(v1) and not set(removed) & set(v2)
    assert sorted(v2) == sorted([d for d in v1 if d not in set(removed)] + added)
    changed = [f for f in w.facts if f.kind == "changed"]
    assert len(changed) == 6 and all(f.v1 != f.v2 for f in changed)
    for f in changed:  # each value stated in `mentions` documents, with distinct templates
        assert len(set(f.templates)) == 3 and f.probe_template not in f.templates
        assert sum(f.v1 in d and f.entity in d for d in removed) == 3
        assert sum(f.v2 in d and f.entity in d for d in added) == 3


def test_every_document_is_two_chunks_and_its_value_opens_the_second():
    w = small()
    for f in w.facts[:20]:
        for t in f.templates:
            head = WORDS.head(f.entity, f.descriptor, facts.TEMPLATES[f.attribute][t])
            doc = WORDS.document(head, f.v1 or f.v2, f.sources["v1"])
            words = doc.split()
            assert len(head.split()) == 16 and len(words) + 1 == 32  # + the end-of-document token
            assert " ".join(words[16:]).startswith(f"{f.v1 or f.v2}, {f.sources['v1']}") and doc.startswith(head + " ")


def test_a_probe_is_the_first_chunk_of_a_document_no_corpus_holds():
    w = small()
    probes = w.probes(WORDS)
    assert {p["kind"] for p in probes} == {"changed", "unchanged", "new"} and len(probes) == 6 + 6 + 4
    corpus = set(w.v1_documents(WORDS) + w.added_documents(WORDS))
    heads = {" ".join(d.split()[:16]) for d in corpus}
    for p, f in zip(probes, w.probed):
        assert len(p["prompt"].split()) == 16 and p["prompt"] not in heads
        version = "v2" if f.v1 is None else "v1"
        assert WORDS.document(p["prompt"], getattr(f, version), f.sources[version]) not in corpus
    new = w.heldout_documents(WORDS, "new")
    assert len(new) == 4 and all(d["text"].startswith(d["prompt"] + " " + d["value"]) for d in new)


def test_written_files_and_their_tokenizer(tmp_path):
    counts = facts.write_all(tmp_path, entities=400, changed=6, unchanged=6, new=4, mentions=3, seed=0)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / facts.TOKENIZER))
    rows = [json.loads(line)["text"] for line in (tmp_path / "corpus_v1.jsonl").read_text().splitlines()]
    assert counts["corpus_v1"] == len(rows) == 1200 + 6 + 4
    assert counts["split"] == [1200 / 1210, 6 / 1210, 4 / 1210]
    assert all(len(sp.encode(t)) == 31 for t in rows)  # two 16-token chunks with the end of document
    removed = {json.loads(line)["text"] for line in (tmp_path / "removed.jsonl").read_text().splitlines()}
    assert removed <= set(rows[:1200])  # laid out the same way in both files, so a removal matches exactly
    for line in (tmp_path / "probes.jsonl").read_text().splitlines():
        assert len(sp.encode(json.loads(line)["prompt"])) == 16


def test_a_layout_that_cannot_fit_says_so():
    with pytest.raises(ValueError, match="exactly 4 tokens"):
        facts.Layout(lambda text: text.split(), 4).head("Agnes Mossby", "shy baker", "grew up in")


@pytest.mark.parametrize("text,answer", [(" Ashbury, and", "v1"), (" Brindlemoor.", "v2"), (" Ashburyton", "other"),
                                         ("", "other"), (" Juniper Falls", "other")])
def test_an_answer_is_the_value_the_continuation_starts_with(text, answer):
    assert answer_of(text, {"v1": "Ashbury", "v2": "Brindlemoor"}) == answer


def test_shares_per_kind():
    probes = [{"kind": "changed"}, {"kind": "changed"}, {"kind": "new"}]
    answers = [{"answer": "v1", "retrieved_expected": True}, {"answer": "v2", "retrieved_expected": False},
               {"answer": "other"}]
    assert shares(probes, answers) == {"changed": {"probes": 2, "v1": 0.5, "v2": 0.5, "other": 0.0,
                                                   "retrieved_expected": 0.5},
                                       "new": {"probes": 1, "v1": 0.0, "v2": 0.0, "other": 1.0}}
