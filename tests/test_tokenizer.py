"""The decoder tokenizer: training, given models, and the errors around them."""

from __future__ import annotations

import fcntl
import os

import pytest

from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer as Tokenizer, train_sentencepiece
from retro_toolkit.errors import UserError
from tests.conftest import CORPUS_ONLY, SMOKE


def _train(tmp_path, texts, vocab):
    out = tmp_path / "t.model"
    train_sentencepiece(texts, out, vocab_size=vocab, model_type="unigram", character_coverage=1.0,
                        max_lines=10_000, byte_fallback=True, seed=1)
    return out


def test_training_is_deterministic_and_round_trips(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:20]]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _train(tmp_path / "a", texts, 600), _train(tmp_path / "b", texts, 600)
    assert a.read_bytes() == b.read_bytes()
    tok = Tokenizer(a)
    assert tok.special_ids() == {"pad": 0, "eod": 3, "bos": 2, "unk": 1}
    odd = "  indented\n\tcode  with   spaces\n\nunicode: café ünïcödé 東京 🙂"
    assert tok.decode(tok.encode([odd])[0]) == odd  # identity normalisation + byte fallback


def test_vocab_that_does_not_fit_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer.vocab_size = 50000 does not fit this corpus"):
        _train(tmp_path, ["a small corpus of a few words"] * 3, 50000)


def test_bad_model_file(tmp_path):
    f = tmp_path / "bad.model"
    f.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load SentencePiece model"):
        Tokenizer(f)


@pytest.mark.slow
def test_given_model_is_copied_and_used(smoke_local, tmp_path, run_cli):
    given = smoke_local / "tokenizer" / "tokenizer.model"
    w = tmp_path / "w"
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={w}", f"tokenizer.model={given}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "using the given SentencePiece model" in p.stdout
    assert (w / "tokenizer" / "tokenizer.model").read_bytes() == given.read_bytes()
    assert (w / "corpus" / "train.bin").read_bytes() == (smoke_local / "corpus" / "train.bin").read_bytes()


@pytest.mark.slow
def test_corpus_too_small_for_the_split(smoke_local, tmp_path, run_cli):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "document number {i} with some words"}}\n' for i in range(5)))
    given = smoke_local / "tokenizer" / "tokenizer.model"
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={tmp_path / 'w'}", f"data.sources=[{{path: {corpus}}}]",
                f"tokenizer.model={given}", "data.split=[0.9,0.05,0.05]")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "the corpus has 5 documents, too few for data.split = [0.9, 0.05, 0.05]" in p.stderr


def test_second_runner_on_the_same_workdir_is_refused(tmp_path, run_cli):
    w = tmp_path / "w"
    w.mkdir()
    fd = os.open(w / ".retro-run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    try:
        p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={w}")
    finally:
        os.close(fd)
    assert p.returncode == 2
    assert f"another retro-run (pid 4242) is running in {w}" in p.stderr
    assert sorted(x.name for x in w.iterdir()) == [".retro-run.lock"]
