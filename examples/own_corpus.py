"""A retrieval database over your own corpus, then nearest-chunk queries from Python.

Takes a .jsonl file with one {"text": ...} document a line (--corpus; without it, one is
written from the docstrings of 30 standard-library modules), runs the smoke recipe's
tokenizer, prepare_corpus and build_db stages on it (64-token chunks, all-MiniLM-L6-v2
embeddings, a faiss index), and prints the database chunks nearest to each query.

    python examples/own_corpus.py --workdir /tmp/retro_own
    python examples/own_corpus.py --workdir /tmp/retro_own --corpus my_docs.jsonl --query "How do I parse JSON?"

Other formats work the same way: a .txt file, a folder of .txt files, or a .jsonl whose
text lives under another key (`data.sources=[{path: FILE, text_key: body}]`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

from retro_toolkit.collections.retrieval.retriever import Retriever
from retro_toolkit.recipe import load_recipe
from retro_toolkit.runner.run import execute

MODULES = ["argparse", "base64", "bisect", "collections", "csv", "datetime", "functools", "hashlib", "heapq",
           "itertools", "json", "logging", "os", "pathlib", "random", "re", "shutil", "sqlite3", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest",
           "uuid", "zipfile"]


def write_demo_corpus(path: Path, max_chars: int) -> Path:
    """One document per module: its docstring and its public functions' and classes' docstrings."""
    with path.open("w") as f:
        for name in MODULES:
            mod = importlib.import_module(name)
            parts = [inspect.getdoc(mod) or ""] + [
                f"{n}: {inspect.getdoc(o)}" for n, o in sorted(vars(mod).items())
                if callable(o) and not n.startswith("_") and getattr(o, "__module__", None) == name and inspect.getdoc(o)]
            f.write(json.dumps({"text": "\n\n".join(parts)[:max_chars]}) + "\n")
    return path


def build_database(corpus: Path, workdir: Path, vocab_size: int) -> Path:
    recipe = load_recipe("smoke", [
        f"workdir={workdir}",
        f"data.sources=[{{path: '{corpus}'}}]",
        "data.split=[0.8,0.1,0.1]",  # valid/test documents are held out of the database
        f"tokenizer.vocab_size={vocab_size}",
        "stages=[tokenizer,prepare_corpus,build_db]",
    ])
    execute(recipe)
    return Path(recipe.workdir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="work directory (created; reused if it exists)")
    p.add_argument("--corpus", type=Path, help='a .jsonl file, one {"text": ...} a line (default: write one)')
    p.add_argument("--max-chars", type=int, default=3000, help="characters per document of the written corpus")
    p.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece vocabulary trained on the corpus")
    p.add_argument("--query", action="append", help="a query text (repeatable)")
    p.add_argument("-k", type=int, default=3, help="chunks per query")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)

    corpus = (a.corpus or write_demo_corpus(a.workdir / "corpus.jsonl", a.max_chars)).resolve()
    workdir = build_database(corpus, a.workdir.resolve(), a.vocab_size)

    retriever = Retriever(workdir)
    print(f"database: {len(retriever)} chunks of {retriever.chunk_length} tokens")
    queries = a.query or ["How do I parse a JSON string?", "Match a regular expression against text."]
    hits = retriever.search(queries, k=a.k)
    for q, ids, dists in zip(queries, hits.ids, hits.distances):
        print(f"\nquery: {q}")
        for chunk_id, d in zip(ids.tolist(), dists.tolist()):
            print(f"  chunk {chunk_id} (distance {d:.3f}): {retriever.chunk_text(chunk_id)[:100]!r}")


if __name__ == "__main__":
    main()
