"""Updating a finished run's database without training again: corpora added, one replaced,
documents taken out; what stays (checkpoints, their manifests), what reruns (eval, QA, the
package), what a server sees, and bad updates refused with nothing changed."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import SMALL, SMOKE, retro_run

pytestmark = pytest.mark.slow

FACTS = ["The retro toolkit lighthouse keeper counts seventeen purple herons every morning at dawn.",
         "Marmalade submarines navigate the frozen canals of an imaginary city called Quillfort.",
         "Zorbian glassblowers trade cobalt lanterns for saffron every second Tuesday."]
ORCHARD = ["The orchard of Vellmire grows square pears that taste of cinnamon.",
           "Captain Oduya sails the tin schooner Wren between the salt islands."]
ORCHARD_NOW = ["The orchard of Vellmire now grows round pears that taste of clove."]


def args() -> list[str]:
    from tests.test_pretrain import TRAIN
    from tests.test_sft_qa import SFT

    return [*SMALL, *TRAIN, *SFT, "stages=[tokenizer,prepare_corpus,build_db,pretrain,eval_ppl,sft,eval_qa,export]"]


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def digest(w: Path, *folders: str) -> dict[str, str]:
    """Every file's hash (a failed stage's error record aside)."""
    return {str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted((w / f).rglob("*")) if p.is_file() and not p.name.endswith(".error.json")}


def train_doc(w: Path, i: int) -> str:
    """The text of train document i as the corpus holds it (decoded)."""
    from retro_toolkit.collections.text import token_stream as ts
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    stream = ts.TokenStream(w / ts.CORPUS_DIR, "train")
    return workdir_tokenizer(w).decode([int(t) for t in stream.document(i)[:-1]])


@pytest.fixture(scope="module")
def updates(tuned, tmp_path_factory):
    """A copy of the tuned run, then v2 (two corpora added), then v3 (one replaced,
    a document of the kept one and one of train taken out), each run once; a server on the run
    from v2 on."""
    from tests.test_pretrain import copy_db
    from tests.test_serve import start, stop

    root = tmp_path_factory.mktemp("updates")
    w = copy_db(tuned, root / "w")
    facts, orchard, orchard_now = jsonl(root / "facts.jsonl", FACTS), jsonl(root / "orchard.jsonl", ORCHARD), \
        jsonl(root / "orchard_now.jsonl", ORCHARD_NOW)
    before = {"checkpoints": digest(w, "checkpoints"), "pretrain": (w / "stages" / "pretrain.json").read_bytes(),
              "sft": (w / "stages" / "sft.json").read_bytes()}
    v2 = [f"retrieval.extra_sources=[{{path: {facts}}}, {{path: {orchard}}}]"]
    taken = train_doc(w, 1)
    removal = jsonl(root / "remove.jsonl", [FACTS[1], taken])
    v3 = [f"retrieval.extra_sources=[{{path: {facts}}}, {{path: {orchard_now}}}]",
          f"retrieval.remove_sources=[{{path: {removal}}}]"]
    runs = {"dry": retro_run(SMOKE, f"workdir={w}", *args(), *v2, "--dry-run"),
            "v2": retro_run(SMOKE, f"workdir={w}", *args(), *v2)}
    assert runs["v2"].returncode == 0, runs["v2"].stdout + runs["v2"].stderr
    server, url = start(w, root, "--live-retrieval")
    import httpx

    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            question = {"query": FACTS[1], "k": 3}
            seen = {"v2": client.post("/v1/retrieve", json=question).json()}
            runs["v3"] = retro_run(SMOKE, f"workdir={w}", *args(), *v3)
            assert runs["v3"].returncode == 0, runs["v3"].stdout + runs["v3"].stderr
            # no /v1/reload: the server notices the new version between batches
            seen["v3"] = client.post("/v1/retrieve", json=question).json()
            seen["health"] = client.get("/health").json()
            seen["answer"] = client.post("/v1/completions", json={"prompt": FACTS[1], "max_tokens": 4,
                                                                   "temperature": 0, "return_retrieved": True}).json()
            seen["reload"] = client.post("/v1/reload").json()
    finally:
        stop(server)
    runs["again"] = retro_run(SMOKE, f"workdir={w}", *args(), *v3)
    return {"w": w, "root": root, "before": before, "runs": runs, "seen": seen, "v3": v3, "taken": taken}


def test_updates_keep_the_trained_models_and_rerun_what_reads_the_database(updates):
    w, runs = updates["w"], updates["runs"]
    dry = runs["dry"].stdout
    for line in ("skip  tokenizer", "run   build_db        changed: retrieval.extra_sources", "skip  pretrain        up to date",
                 "run   eval_ppl        the database was updated", "skip  sft             up to date",
                 "run   eval_qa         the database was updated", "run   export          the database was updated"):
        assert line in dry, dry
    for name in ("v2", "v3"):
        out = runs[name].stdout
        assert "skip  pretrain" in out and "skip  sft" in out and "run   eval_qa" in out, out
        assert "reusing the trained Flat index (not retrained)" in out
        assert "train neighbours kept as trained on (database version 1)" in out
    assert "embedding_blocks_computed=2" in runs["v2"].stdout  # one block per added corpus, no other
    assert digest(w, "checkpoints") == updates["before"]["checkpoints"]
    assert (w / "stages" / "pretrain.json").read_bytes() == updates["before"]["pretrain"]
    assert (w / "stages" / "sft.json").read_bytes() == updates["before"]["sft"]
    # a second identical update runs nothing
    again = runs["again"].stdout
    assert again.count("skip  ") == 8 and "run   " not in again, again
    # every consumer records the version it used
    version = json.loads((w / "db" / "version.json").read_text())
    assert version["version"] == 3 and [h["version"] for h in version["history"]] == [1, 2, 3]
    assert version["removed_docs"] == 2
    ppl = json.loads((w / "eval" / "ppl.json").read_text())
    assert {row["database_version"] for row in ppl.values()} == {3}
    assert json.loads((w / "eval" / "qa" / "scores.json").read_text())["smoke"]["database_version"] == 3
    with tarfile.open(w / "export" / "smoke.nemo") as t:
        retrieval = yaml.safe_load(t.extractfile("./retrieval.yaml"))
    assert retrieval["database"]["version"] == 3 and retrieval["trained_on_database_version"] == 1
    meta = json.loads((w / "neighbors" / "meta.json").read_text())
    assert meta["splits"]["train"]["database_version"] == 1 and meta["splits"]["valid"]["database_version"] == 3
    assert json.loads((w / "stages" / "pretrain.json").read_text())["summary"]["neighbors_database_version"] == 1


def test_taken_out_documents_are_retrieved_by_no_path_and_their_text_is_gone(updates):
    from retro_toolkit.collections.retrieval import blocks, chunk_db
    from retro_toolkit.collections.retrieval.neighbors import load_neighbors
    from retro_toolkit.collections.retrieval.retriever import Retriever
    from retro_toolkit.collections.retro.dataset import RetroDataset

    w = updates["w"]
    db = chunk_db.load(w / "db" / "chunks.h5")
    gone = np.flatnonzero(np.asarray(db.chunk_doc) < 0)
    # the replaced corpus keeps its ids as a retired part; both documents' chunks are empty
    assert db.parts[0] == "train" and db.parts[2].startswith("retired:extra:") and db.removed_docs == 2
    assert len(gone) > 3 and np.all(db.chunk_start[gone] == db.chunk_end[gone])
    for split in ("valid", "test"):  # searched again: no taken-out chunk
        assert not np.isin(load_neighbors(w, split), gone).any()
    kept = load_neighbors(w, "train")  # as trained on: they refer to taken-out chunks ...
    assert np.isin(kept, gone).any()
    data = RetroDataset(w, "train", 128, 64, 2, 128, pad_id=0)
    for i in range(len(data)):  # ... which no sample receives
        assert not np.isin(data[i]["neighbor_ids"], gone).any()
    r = Retriever(w)
    hits = r.search([FACTS[1], updates["taken"][:300]], k=20)
    assert not np.isin(hits.ids, gone).any() and r.index.ntotal == db.live_chunks
    # the server: no taken-out chunk once build_db wrote v3, without a reload
    seen = updates["seen"]
    assert seen["health"]["database_version"] == 3
    assert seen["reload"]["version"] == 3 and seen["reload"]["chunks"] == db.live_chunks
    assert seen["v2"]["data"][0]["neighbours"][0]["text"].startswith("Marmalade submarines")
    assert all(n["chunk_id"] not in gone for n in seen["v3"]["data"][0]["neighbours"])
    assert not np.isin(np.asarray(seen["answer"]["choices"][0]["retrieved_chunk_ids"]), gone).any()
    # the taken-out extra document's tokens are in no database file; its vectors and codes are zero
    ids = r.tokenizer.encode([FACTS[1]])[0]
    for f in (p for d in ("db", "index", "neighbors") for p in (w / d).rglob("*") if p.is_file()):
        for dtype in (np.uint16, np.int32, np.int64):
            assert np.asarray(ids[2:10], dtype=dtype).tobytes() not in f.read_bytes(), f
    emb = {s: blocks.read(f) for f in (w / "db" / "embeddings").glob("*.h5") for s in [int(f.stem.split("-")[0])]}
    for c in gone[gone < db.part_chunks[2]]:
        start = max(s for s in emb if s <= c)
        assert not emb[start][c - start].any()


def test_a_fact_probe_records_whether_its_first_chunk_retrieved_the_expected_value(updates):
    from retro_toolkit.collections.generate.session import load_session
    from retro_toolkit.collections.knowledge.probes import ANSWERS, ask

    prompt = " ".join([ORCHARD_NOW[0]] * 8)  # a first chunk that retrieves the replacing corpus
    probe = {"prompt": prompt, "entity": "Vellmire", "v1": "square", "v2": "round", "kind": "changed"}
    rows = ask(load_session(workdir=updates["w"]), [{**probe, "expect": "v2"}, {**probe, "expect": "v1"}],
               max_new_tokens=2)
    # the replaced corpus's "square pears" are retrieved no more
    assert [r["retrieved_expected"] for r in rows] == [True, False]
    assert all(r["answer"] in ANSWERS and isinstance(r["text"], str) for r in rows)


def test_recomputing_the_train_neighbours_is_a_choice_that_trains_again(updates):
    p = retro_run(SMOKE, f"workdir={updates['w']}", *args(), *updates["v3"], "retrieval.train_neighbors=recompute",
                  "--dry-run")
    assert p.returncode == 0, p.stderr
    for line in ("run   build_db        changed: retrieval.train_neighbors", "run   pretrain        upstream 'build_db' changed",
                 "run   sft             upstream 'pretrain' changed"):
        assert line in p.stdout, p.stdout


def test_bad_updates_exit_2_naming_the_source_and_change_nothing(updates, tmp_path):
    from retro_toolkit.collections.text.tokenizer import open_tokenizer
    from tests.hf_tokenizers import make_hf_tokenizer
    from tests.test_corpus_formats import megatron_dataset

    w = updates["w"]
    before = digest(w, "stages", "db", "index", "neighbors", "eval", "export")
    other = megatron_dataset(tmp_path / "ids", open_tokenizer(make_hf_tokenizer(tmp_path / "hf")), FACTS * 40)
    stray = jsonl(tmp_path / "stray.jsonl", ["A sentence that no document of the database holds."])
    cases = [
        ([f"retrieval.remove_sources=[{{path: {updates['root'] / 'remove.jsonl'}}}, {{path: {stray}}}]"],
         f"document 0 of retrieval.remove_sources[1] ({stray}) is not in the database"),
        (["retrieval.index.string=HNSW32"], "faiss cannot add precomputed codes to this index type"),
        ([f"retrieval.extra_sources=[{{path: {other}}}]"], "retrieval.extra_sources[0].path"),
    ]
    for overrides, message in cases:
        p = retro_run(SMOKE, f"workdir={w}", *args(), *updates["v3"], *overrides)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stdout + p.stderr
        if "extra_sources" in overrides[0]:
            assert "written with another tokenizer. Write it again with this work directory's tokenizer" in p.stderr
        assert digest(w, "stages", "db", "index", "neighbors", "eval", "export") == before, message
