"""Writes tests/data/corpus_formats/: the reference corpus as a Hugging Face datasets folder,
written by the `datasets` library's own save_to_disk (not a dependency of the toolkit or its
tests, so the folder is committed). Run with an environment that has `datasets` installed:

    python tests/data/make_corpus_formats.py

reference.jsonl is the same documents, one JSON object per line (the corpus the other formats
are compared against); tests/test_corpus_formats.py writes the .gz, .zst, Parquet, Arrow and
Megatron forms itself with gzip, zstandard, pyarrow and megatron-core.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydoc_data.topics

OUT = Path(__file__).parent / "corpus_formats"


def documents() -> list[dict]:
    topics = sorted(pydoc_data.topics.topics.items())[:24]
    docs = [{"id": name, "text": text[:700]} for name, text in topics]
    docs[3]["text"] = "Unicode: héllo wörld, 日本語, emoji ✓ — and a tab\there."
    docs[5]["text"] = "   "  # empty after stripping: every reader skips it alike
    return docs


def main() -> None:
    import datasets

    docs = documents()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    (OUT / "reference.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                         encoding="utf-8")
    datasets.Dataset.from_list(docs).save_to_disk(str(OUT / "hf_dataset"))
    print(f"wrote {OUT} with datasets {datasets.__version__}")


if __name__ == "__main__":
    main()
