"""Per-source splits (prepare_corpus) and weighted blends of sources in training samples."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from retro_toolkit.collections.retro import blend
from tests.conftest import CORPUS_ONLY, SMOKE


def test_schedule_follows_the_weights_in_every_prefix():
    src, pos = blend.schedule([1.0, 3.0, 0.0, 0.5], 900)
    assert len(src) == 900 and set(np.unique(src)) == {0, 1, 3}
    for n in (1, 7, 100, 900):
        counts = np.bincount(src[:n], minlength=4)
        expected = np.array([1.0, 3.0, 0.0, 0.5]) / 4.5 * n
        assert np.all(np.abs(counts - expected) <= 1.0), (n, counts, expected)
    for s in (0, 1, 3):  # each source's samples are numbered 0, 1, 2, ... in order
        assert np.array_equal(pos[src == s], np.arange((src == s).sum()))


def test_source_windows_partition_the_stream():
    offsets = np.array([0, 50, 130, 200, 330, 400])  # 5 documents
    per = blend.source_windows(offsets, [2, 3], 64, 399 // 64)
    assert [list(p) for p in per] == [[0, 1, 2], [3, 4, 5]]  # window 2 starts at 128 < 130: source 0


def test_a_source_without_windows_but_with_weight_is_refused():
    with pytest.raises(Exception, match=r"data.sources\[1\] has weight 2.0 .* no training window"):
        blend.Blend([np.arange(3), np.arange(0)], [1.0, 2.0], 10, seed=1)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, ):
    from tests.conftest import retro_run

    d = tmp_path_factory.mktemp("two_sources")
    rng = random.Random(0)
    words = {"a": [f"alpha{i}" for i in range(40)], "b": [f"beta{i}" for i in range(40)]}
    for name, n in (("a", 10), ("b", 20)):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words[name]) for _ in range(150))}) + "\n")
    w = d / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, f"workdir={w}", f"data.sources=[{{path: {d / 'a.jsonl'}}}, {{path: {d / 'b.jsonl'}}}]",
                  "data.split=[0.8,0.1,0.1]", "tokenizer.vocab_size=280")
    assert p.returncode == 0, p.stdout + p.stderr
    return w


def test_every_split_holds_every_source(two_sources):
    from retro_toolkit.collections.text.token_stream import TokenStream
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    meta = json.loads((two_sources / "corpus" / "meta.json").read_text())["splits"]
    assert [meta[s]["source_documents"] for s in ("train", "valid", "test")] == [[8, 16], [1, 2], [1, 2]]
    tok = workdir_tokenizer(two_sources)
    valid = TokenStream(two_sources / "corpus", "valid")
    texts = [tok.decode(list(valid.tokens[a:b - 1])) for a, b in zip(valid.doc_offsets, valid.doc_offsets[1:])]
    assert [t.split()[0][:4] for t in texts] == ["alph", "beta", "beta"]


def test_weights_pick_the_sources_windows(two_sources):
    from retro_toolkit.collections.retro.dataset import RetroDataset
    from retro_toolkit.collections.text.token_stream import TokenStream

    train = TokenStream(two_sources / "corpus", "train")
    a_end = int(train.doc_offsets[8])
    kw = dict(workdir=two_sources, split="train", seq_length=64, chunk_length=64, num_neighbors=2,
              retrieved_length=128, pad_id=0, num_samples=300, with_neighbors=False)
    only_a = RetroDataset(**kw, source_weights=[1.0, 0.0])
    assert all(only_a.window(i) * 64 < a_end for i in range(300))
    even = RetroDataset(**kw, source_weights=[1.0, 1.0])
    from_a = sum(even.window(i) * 64 < a_end for i in range(300))
    assert from_a == 150  # half the samples, although source a is a third of the tokens
    plain = RetroDataset(**kw)
    assert abs(sum(plain.window(i) * 64 < a_end for i in range(300)) - 100) <= 5
    with pytest.raises(Exception, match="3 weights but the corpus was built from 2 sources"):
        RetroDataset(**kw, source_weights=[1.0, 1.0, 1.0])
