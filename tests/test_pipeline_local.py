"""The smoke recipe's corpus stages through the real runner: NeMo-Run, local and torchrun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retro_toolkit.collections.text.token_stream import TokenStream
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from tests.conftest import CORPUS_ONLY, SMOKE

pytestmark = pytest.mark.slow

CORPUS_FILES = [f"{s}{ext}" for s in ("train", "valid", "test") for ext in (".bin", ".idx.npy")] + ["meta.json"]


def _manifest(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / "stages" / f"{stage}.json").read_text())


def test_smoke_writes_token_streams_and_manifests(smoke_local):
    w = smoke_local
    assert (w / "recipe.resolved.yaml").is_file()
    tok = workdir_tokenizer(w)
    assert tok.vocab_size == 4000 and tok.eod_id == 3 and tok.pad_id == 0
    meta = json.loads((w / "corpus" / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert {s: meta["splits"][s]["documents"] for s in meta["splits"]} == {"train": 71, "valid": 4, "test": 4}
    for split in ("train", "valid", "test"):
        ts = TokenStream(w / "corpus", split)
        assert len(ts) == meta["splits"][split]["tokens"] > 0
        # every document ends with EOD and contains no other EOD
        ends = ts.doc_offsets[1:] - 1
        assert np.all(ts.tokens[ends] == tok.eod_id)
        assert int(np.sum(ts.tokens == tok.eod_id)) == ts.num_docs
    # documents decode back to the pydoc topics, in order
    from pydoc_data.topics import topics

    first = TokenStream(w / "corpus", "train").document(0)[:-1]
    assert tok.decode(first.tolist()) == topics[sorted(topics)[0]]
    m = _manifest(w, "prepare_corpus")
    assert m["summary"]["documents"] == 79 and m["world_size"] == 1
    assert m["inputs"]["tokenizer"] == _manifest(w, "tokenizer")["fingerprint"]
    assert m["timings"]["wall_s"] >= 0


def test_second_run_skips_everything(smoke_local, run_cli):
    before = {s: (smoke_local / "stages" / f"{s}.json").read_bytes() for s in ("tokenizer", "prepare_corpus")}
    mtime = (smoke_local / "corpus" / "train.bin").stat().st_mtime_ns
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_local}")
    assert p.returncode == 0, p.stderr
    assert "skip  tokenizer" in p.stdout and "skip  prepare_corpus" in p.stdout
    assert "==>" not in p.stdout  # no job was launched
    assert (smoke_local / "corpus" / "train.bin").stat().st_mtime_ns == mtime
    assert before == {s: (smoke_local / "stages" / f"{s}.json").read_bytes() for s in before}


@pytest.fixture
def smoke_copy(smoke_local, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(smoke_local, w)
    return w


def test_changed_setting_reruns_stage_and_downstream(smoke_copy, run_cli):
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_copy}", "tokenizer.vocab_size=3000")
    assert p.returncode == 0, p.stderr
    assert "run   tokenizer       changed: tokenizer" in p.stdout
    assert "run   prepare_corpus  upstream 'tokenizer' changed" in p.stdout
    assert json.loads((smoke_copy / "corpus" / "meta.json").read_text())["vocab_size"] == 3000
    # a change that only touches prepare_corpus leaves the tokenizer alone
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_copy}", "tokenizer.vocab_size=3000", "data.split=[0.8,0.1,0.1]")
    assert p.returncode == 0, p.stderr
    assert "skip  tokenizer" in p.stdout and "run   prepare_corpus  changed: data" in p.stdout


def test_force_reruns_one_stage(smoke_copy, run_cli):
    tok_manifest = (smoke_copy / "stages" / "tokenizer.json").read_bytes()
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_copy}", "--force", "prepare_corpus")
    assert p.returncode == 0, p.stderr
    assert "skip  tokenizer" in p.stdout and "run   prepare_corpus  forced" in p.stdout
    assert (smoke_copy / "stages" / "tokenizer.json").read_bytes() == tok_manifest


def test_stages_flag_pulls_in_unfinished_dependencies(tmp_path, run_cli):
    w = tmp_path / "w"
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={w}", "--stages", "tokenizer")
    assert p.returncode == 0, p.stderr
    assert (w / "stages" / "tokenizer.json").exists() and not (w / "stages" / "prepare_corpus.json").exists()
    (w / "stages" / "tokenizer.json").unlink()
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={w}", "--stages", "prepare_corpus")
    assert p.returncode == 0, p.stderr
    assert "run   tokenizer" in p.stdout and "run   prepare_corpus" in p.stdout


def test_torchrun_two_processes_byte_identical(smoke_local, tmp_path, run_cli):
    w = tmp_path / "tr"
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={w}", "executor=torchrun", "executor.nproc_per_node=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert _manifest(w, "prepare_corpus")["world_size"] == 2
    for name in CORPUS_FILES:
        assert (w / "corpus" / name).read_bytes() == (smoke_local / "corpus" / name).read_bytes(), name
    assert (w / "tokenizer" / "tokenizer.model").read_bytes() == (
        smoke_local / "tokenizer" / "tokenizer.model"
    ).read_bytes()


def test_bad_document_in_a_stage_exits_2_and_keeps_earlier_outputs(smoke_copy, tmp_path, run_cli):
    corpus = tmp_path / "c.jsonl"
    # The bad byte lies past what the up-front check reads (100 records): the stage finds it.
    corpus.write_bytes(b'{"text": "good"}\n' * 100 + b'{"text": "bad \xff byte"}\n')
    before = {n: (smoke_copy / "corpus" / n).read_bytes() for n in CORPUS_FILES}
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_copy}", f"data.sources=[{{path: {corpus}}}]")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{corpus}:101: invalid UTF-8" in p.stderr and "tokenizer.rank0.log" in p.stderr
    assert "Traceback" not in p.stderr
    # the earlier corpus is untouched
    assert before == {n: (smoke_copy / "corpus" / n).read_bytes() for n in CORPUS_FILES}


def test_crashing_stage_exits_1_and_names_its_log(smoke_copy, run_cli):
    (smoke_copy / "corpus" / ".parts").write_text("in the way")  # the stage cannot make its folder
    p = run_cli(SMOKE, CORPUS_ONLY, f"workdir={smoke_copy}", "--force", "prepare_corpus")
    assert p.returncode == 1, p.stdout + p.stderr
    log = smoke_copy / "logs" / "prepare_corpus.rank0.log"
    assert f"stage 'prepare_corpus' failed. Its log: {log}" in p.stderr
    assert "prepare_corpus  failed" in p.stdout
    assert "Traceback" in log.read_text() and "FileExistsError" in log.read_text()
    out = smoke_copy / "logs" / "prepare_corpus.out"  # the job's own output, its command first
    assert f"(the job's own output: {out})" in p.stderr
    assert f"-m retro_toolkit.launch prepare_corpus {smoke_copy / 'recipe.resolved.yaml'}" in out.read_text()
    assert "FileExistsError" in out.read_text()
    assert not (smoke_copy / "stages" / "prepare_corpus.json").exists()
