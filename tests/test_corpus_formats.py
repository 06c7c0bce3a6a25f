"""Corpus sources beyond .jsonl and .txt: each format gives the same corpus files as the .jsonl
holding the same documents. The compressed, Parquet and Arrow forms are written here with gzip,
zstandard and pyarrow; the Hugging Face datasets folder by `datasets` itself
(tests/data/make_corpus_formats.py); the Megatron indexed dataset by megatron-core's own
IndexedDatasetBuilder."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from tests.conftest import SMOKE, retro_run

DATA = Path(__file__).parent / "data" / "corpus_formats"
REFERENCE = DATA / "reference.jsonl"
STAGES = "stages=[tokenizer,prepare_corpus]"


def corpus_files(w: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((w / "corpus").iterdir()) if p.is_file()}


def prepare(w: Path, source: str, tokenizer: Path, *extra: str):
    return retro_run(SMOKE, STAGES, f"workdir={w}", f"data.sources=[{{path: '{source}'}}]", "data.split=[0.8,0.1,0.1]",
                     f"tokenizer.model={tokenizer}", *extra)


def records() -> list[dict]:
    return [json.loads(line) for line in REFERENCE.read_text(encoding="utf-8").splitlines()]


def megatron_dataset(prefix: Path, tok, docs: list[str]) -> Path:
    """What preprocess_data.py --append-eod writes: one sequence per document, EOS appended."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for ids in tok.encode(docs):
        builder.add_document(torch.tensor(ids + [tok.eod_id]), [len(ids) + 1])
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.fixture(scope="module")
def reference(smoke_local, tmp_path_factory):
    """(tokenizer file, the .jsonl's corpus files)."""
    tok = smoke_local / "tokenizer" / "tokenizer.model"
    w = tmp_path_factory.mktemp("ref") / "w"
    p = prepare(w, REFERENCE, tok)
    assert p.returncode == 0, p.stdout + p.stderr
    return tok, corpus_files(w)


def _gz(tmp: Path) -> Path:
    out = tmp / "c.jsonl.gz"
    out.write_bytes(gzip.compress(REFERENCE.read_bytes()))
    return out


def _zst(tmp: Path) -> Path:
    import zstandard

    out = tmp / "c.jsonl.zst"
    out.write_bytes(zstandard.ZstdCompressor().compress(REFERENCE.read_bytes()))
    return out


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records()), out, row_group_size=5)  # several row groups
    return out


def _arrow(tmp: Path) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(records())
    out = tmp / "c.arrow"
    with pa.ipc.new_file(out, table.schema) as f:  # the IPC file format (datasets writes the stream format)
        for batch in table.to_batches(max_chunksize=7):
            f.write_batch(batch)
    return out


def _folder(tmp: Path) -> Path:
    """A folder of two files in two formats: read in path order, the same documents."""
    folder = tmp / "mixed"
    (folder / "b").mkdir(parents=True)
    lines = REFERENCE.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "a.jsonl").write_text("".join(lines[:10]), encoding="utf-8")
    (folder / "b" / "rest.jsonl.gz").write_bytes(gzip.compress("".join(lines[10:]).encode()))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("make", [_gz, _zst, _parquet, _arrow, _folder, lambda tmp: DATA / "hf_dataset"],
                         ids=["jsonl.gz", "jsonl.zst", "parquet", "arrow", "folder", "hf_dataset"])
def test_each_format_gives_the_corpus_files_of_the_equivalent_jsonl(reference, tmp_path, make):
    tok, want = reference
    p = prepare(tmp_path / "w", make(tmp_path), tok)
    assert p.returncode == 0, p.stdout + p.stderr
    assert corpus_files(tmp_path / "w") == want


@pytest.mark.slow
def test_a_megatron_indexed_dataset_gives_the_token_stream_of_its_jsonl(reference, tmp_path):
    from retro_toolkit.collections.text import token_stream as ts
    from retro_toolkit.collections.text.megatron_indexed import IndexedDataset

    tok_file, want = reference
    tok = workdir_tokenizer(tok_file.parent.parent)
    # The whitespace-only record becomes a document of nothing but the EOS, as a builder that
    # appends one to every document writes it: it is skipped as the .jsonl's blank record is.
    docs = [r["text"] if r["text"].strip() else "" for r in records()]
    blank = docs.index("")
    prefix = megatron_dataset(tmp_path / "pile.v2_text_document", tok, docs)  # a dot in the prefix, as people name them
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.document(2).tolist() == tok.encode([docs[2]])[0] + [tok.eod_id]
    assert ds.document(blank).tolist() == [tok.eod_id]
    for source in (prefix, f"{prefix}.idx"):
        w = tmp_path / f"w{len(str(source))}"
        p = prepare(w, source, tok_file)
        assert p.returncode == 0, p.stdout + p.stderr
        assert corpus_files(w) == want  # meta.json too: one empty document skipped, as in the .jsonl
    assert json.loads(want["meta.json"])["empty_skipped"] == 1
    stream = ts.TokenStream(w / ts.CORPUS_DIR, "train")
    assert stream.document(0).tolist() == tok.encode([docs[0]])[0] + [tok.eod_id]
    # max_docs reads documents one by one instead of the fast count: it skips the same document
    from retro_toolkit.collections.text import corpus_layout, shards
    from retro_toolkit.collections.text.decoding import ReadStats
    from retro_toolkit.stages.prepare_corpus import SourceConfig

    src = SourceConfig(path=f"{prefix}.idx", max_docs=blank + 2)
    (shard,) = shards.plan([src], 64, ["data.sources[0]"])
    stats = ReadStats()
    read = list(corpus_layout.documents(shard, src, "replace", stats, blank + 2, tok.eod_id))
    assert len(read) == blank + 2 and stats.empty_skipped == 1
    assert corpus_layout.count(shard, src, "replace", None, eod_id=tok.eod_id).docs == len(docs) - 1


@pytest.mark.slow
def test_bad_sources_exit_2_naming_the_file(reference, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok_file, _ = reference
    tok = workdir_tokenizer(tok_file.parent.parent)
    prefix = megatron_dataset(tmp_path / "ids", tok, ["The with statement.", "A class definition."])

    def refused(source, match, tokenizer=tok_file, before_any_work=True):
        w = tmp_path / "w"
        shutil.rmtree(w, ignore_errors=True)
        p = prepare(w, source, tokenizer)
        assert p.returncode == 2, p.stdout + p.stderr
        assert match in p.stdout + p.stderr and "Traceback" not in p.stderr
        if before_any_work:
            assert not w.exists()

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(f"{prefix}.idx", alone / "ids.idx")
    refused(alone / "ids.idx", f"has ids.idx but no ids.bin (looked for {alone / 'ids.bin'})")

    other = tmp_path / "other.model"  # a smaller vocabulary: the dataset's ids run past it
    from retro_toolkit.collections.text.sentencepiece_tokenizer import train_sentencepiece

    train_sentencepiece(iter([r["text"] for r in records()] * 3), other, 120, "bpe", 1.0, 10000, False, 1)
    refused(prefix, "past the tokenizer's vocabulary (120): it was written with another tokenizer", other)
    refused(prefix, "no tokenizer can be trained on it. Set tokenizer.model", "null")

    hf = tmp_path / "hf"  # written by a byte-level BPE, read with the SentencePiece model: ids in range, wrong text
    from tests.hf_tokenizers import make_hf_tokenizer
    from retro_toolkit.collections.text.tokenizer import open_tokenizer

    hf_prefix = megatron_dataset(tmp_path / "hf_ids", open_tokenizer(make_hf_tokenizer(hf)), [r["text"] for r in records()[:8]])
    refused(hf_prefix, "token ids do not round-trip through the tokenizer")

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["some text"], "n": [1]}), table)
    refused(table, f"{table} has no column 'text' (its columns: body, n). Set data.sources[0].text_key")

    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(REFERENCE.read_bytes())[:-300])
    refused(gz, f"{gz}: cannot decompress")  # the up-front probe reads this small file to its cut

    zst = tmp_path / "cut.jsonl.zst"
    import zstandard

    zst.write_bytes(zstandard.ZstdCompressor().compress(REFERENCE.read_bytes())[:-100])
    refused(zst, f"{zst}: cannot decompress (the input ends inside a zstd frame)")

    folder = tmp_path / "folder_with_ids"  # a dataset inside a folder source is held to the same rules
    folder.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{prefix}{suffix}", folder / f"ids{suffix}")
    refused(folder, "is a Megatron indexed dataset", "null")

    modes = tmp_path / "mm"  # a multimodal index: a mode byte per sequence after the document index
    shutil.copyfile(f"{prefix}.bin", f"{modes}.bin")
    Path(f"{modes}.idx").write_bytes(Path(f"{prefix}.idx").read_bytes() + b"\x00\x00")
    refused(modes, "is a multimodal dataset")

    csv = tmp_path / "c.csv"
    csv.write_text("text\nhello\n")
    refused(csv, "is not a corpus format this toolkit reads. Give a .jsonl (.jsonl.gz, .jsonl.zst), .txt, .parquet")


def _mixed_sources(tmp: Path, tok) -> tuple[list[str], int]:
    """A 3.2 MB .jsonl (four byte-range shards at shard_mb=1), a Megatron dataset of several
    document-range shards, and the datasets folder; and a max_docs that cuts the .jsonl inside
    its second shard."""
    import pydoc_data.topics

    texts = [t for t in pydoc_data.topics.topics.values() if t.strip()]
    big = tmp / "big.jsonl"
    starts = []
    with open(big, "w", encoding="utf-8") as f:
        i = 0
        while f.tell() < 3_200_000:
            starts.append(f.tell())
            f.write(json.dumps({"text": texts[i % len(texts)][:2000 + i % 1500] + f" ({i})"}) + "\n")
            if i % 97 == 0:
                f.write(json.dumps({"text": " \n "}) + "\n")  # empty documents land in several shards
            i += 1
    prefix = megatron_dataset(tmp / "ids", tok, [t[:3000] for t in texts] * 8)
    return [str(big), str(prefix), str(DATA / "hf_dataset")], sum(1 for x in starts if x < 1_600_000)


@pytest.mark.slow
@pytest.mark.parametrize("split_by", ["document", "passage"])
def test_two_ranks_reading_disjoint_shards_write_the_corpus_of_one(reference, tmp_path, split_by):
    tok_file, _ = reference
    tok = workdir_tokenizer(tok_file.parent.parent)
    paths, max_docs = _mixed_sources(tmp_path, tok)
    if split_by == "passage":  # token ids cannot be cut into passages
        paths = [paths[0], paths[2]]
    sources = "[" + ", ".join(f"{{path: '{p}'" + (f", max_docs: {max_docs}}}" if i == 0 else "}")
                              for i, p in enumerate(paths)) + "]"
    common = [SMOKE, STAGES, f"data.sources={sources}", "data.split=[0.8,0.1,0.1]", f"tokenizer.model={tok_file}",
              f"data.split_by={split_by}", "data.passage_chars=800"]
    one = retro_run(*common, f"workdir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stdout + one.stderr
    two = retro_run(*common, f"workdir={tmp_path / 'two'}", "data.shard_mb=1", "executor=torchrun",
                    "executor.nproc_per_node=2")
    assert two.returncode == 0, two.stdout + two.stderr
    shards = [int(re.search(r"in (\d+) read shards", (tmp_path / w / "logs" / "prepare_corpus.rank0.log").read_text())[1])
              for w in ("one", "two")]
    assert shards[0] == len(paths) and shards[1] >= len(paths) + 3  # the big file alone is cut in three or more
    got, want = corpus_files(tmp_path / "two"), corpus_files(tmp_path / "one")
    assert got == want
    meta = json.loads(want["meta.json"])
    assert meta["empty_skipped"] > 1
    if split_by == "document":
        assert sum(meta["splits"][s]["source_documents"][0] for s in ("train", "valid", "test")) == max_docs
