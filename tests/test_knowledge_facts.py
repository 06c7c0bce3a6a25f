"""The invented-facts corpus for the knowledge-update demonstration: deterministic, and its
databases, probes and held-out documents relate as the demonstration needs."""

from __future__ import annotations

import json

from retro_toolkit.collections.knowledge import facts


def small(seed: int = 0) -> facts.FactWorld:
    return facts.FactWorld(entities=40, changed=6, unchanged=6, new=4, mentions=3, seed=seed)


def test_the_same_seed_gives_the_same_world_and_another_seed_another():
    assert small().v1_documents() == small().v1_documents()
    assert small().probes() == small().probes()
    assert small(1).v1_documents() != small().v1_documents()


def test_the_update_takes_out_exactly_the_changed_facts_and_adds_their_new_values():
    w = small()
    v1, removed, added, v2 = w.v1_documents(), w.removed_documents(), w.added_documents(), w.v2_documents()
    assert len(v1) == 40 * 2 * 3 and len(removed) == 6 * 3 and len(added) == (6 + 4 * 2) * 3
    assert set(removed) <= set(v1) and not set(removed) & set(v2)
    assert sorted(v2) == sorted([d for d in v1 if d not in set(removed)] + added)
    changed = [f for f in w.facts if f.kind == "changed"]
    assert len(changed) == 6 and all(f.v1 != f.v2 for f in changed)
    for f in changed:  # each value stated in `mentions` documents, with distinct templates
        assert len(set(f.templates)) == 3 and f.probe_template not in f.templates
        assert sum(f.v1 in d and f.entity in d for d in removed) == 3
        assert sum(f.v2 in d and f.entity in d for d in added) == 3


def test_a_probe_is_its_probe_document_cut_before_the_value():
    w = small()
    probes = w.probes()
    assert {p["kind"] for p in probes} == {"changed", "unchanged", "new"} and len(probes) == 6 + 6 + 4 * 2
    for p, f in zip(probes, w.probed):
        value = f.v2 if f.v1 is None else f.v1
        document = facts.render(f.attribute, f.probe_template, f.entity, f.descriptor, value)
        assert document.startswith(p["prompt"] + " " + value)
        assert document not in w.v1_documents() + w.added_documents()  # never in any corpus
    new = w.heldout_documents("new")
    assert len(new) == 8 and all(d["text"].startswith(d["prompt"] + " " + d["value"]) for d in new)


def test_written_files_and_chunk_padding(tmp_path):
    words = lambda text: text.split()  # noqa: E731  (one token per word)
    counts = facts.write_all(tmp_path, encode=words, entities=40, changed=6, unchanged=6, new=4, mentions=3, seed=0)
    rows = [json.loads(line)["text"] for line in (tmp_path / "corpus_v1.jsonl").read_text().splitlines()]
    assert counts["corpus_v1"] == len(rows) == 240 + 6 + 8
    assert counts["split"] == [240 / 254, 6 / 254, 8 / 254]
    assert all((len(words(t)) + 1) % 16 == 0 for t in rows)  # text and end of document fill whole chunks
    removed = {json.loads(line)["text"] for line in (tmp_path / "removed.jsonl").read_text().splitlines()}
    assert removed <= set(rows[:240])  # padded the same way in both files, so a removal matches exactly
