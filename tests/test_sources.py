"""Corpus readers and the document split, in-process on small real files."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from retro_toolkit.collections.text.decoding import ReadStats
from retro_toolkit.collections.text.corpus_layout import iter_documents
from retro_toolkit.collections.text.splits import split_bounds
from retro_toolkit.errors import UserError


def _sources(*specs):
    return OmegaConf.create([{"path": str(p), "text_key": k, "max_docs": m} for p, k, m in specs])


def _read(sources, policy="error"):
    stats = ReadStats()
    docs = list(iter_documents(sources, policy, stats))
    return docs, stats


def test_jsonl_skips_and_counts_empty_documents(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": "   "}\n{"text": "two", "id": 3}\n{"text": ""}\n')
    docs, stats = _read(_sources((f, "text", None)))
    assert [t for t, _ in docs] == ["one", "two"]
    assert [o for _, o in docs] == [f"{f}:1", f"{f}:4"]
    assert stats.empty_skipped == 2 and stats.per_source == [2]


def test_jsonl_errors_name_file_line_and_key(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match=rf"{f}:2: no field 'text'.*data.sources\[0\].text_key"):
        _read(_sources((f, "text", None)))
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=rf"{f}:2: not valid JSON"):
        _read(_sources((f, "text", None)))
    f.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match="field 'text' is a int, not a string"):
        _read(_sources((f, "text", None)))


def test_invalid_utf8_is_an_error_naming_file_and_line_or_replaced(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{f}:3: invalid UTF-8 at byte 13.*data.on_invalid_utf8=replace"):
        _read(_sources((f, "text", None)))
    docs, stats = _read(_sources((f, "text", None)), "replace")
    assert docs[2][0] == "caf\ufffd" and stats.invalid_utf8_replaced == 1


def test_txt_folder_sorted_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("aye")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "ignored.md").write_text("no")
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(UserError, match=r"bad.txt \(line 2 of the document\): invalid UTF-8"):
        _read(_sources((tmp_path, "text", None)))
    (tmp_path / "bad.txt").unlink()
    docs, stats = _read(_sources((tmp_path, "text", None)))
    assert [t for t, _ in docs] == ["first", "bee", "aye"]
    assert stats.empty_skipped == 1


def test_max_docs_and_builtin_pydoc():
    docs, _ = _read(OmegaConf.create([{"path": "builtin:pydoc", "text_key": "text", "max_docs": 5}]))
    assert len(docs) == 5
    assert docs[0][1].startswith("builtin:pydoc#") and len(docs[0][0]) > 100


def test_builtin_wiki_sample_has_real_articles():
    pytest.importorskip("gensim")
    docs, _ = _read(OmegaConf.create([{"path": "builtin:wiki-sample", "text_key": "text", "max_docs": None}]))
    assert 90 <= len(docs) <= 110
    assert sum(len(t) for t, _ in docs) > 500_000
    assert all("[[" not in t[:2000] for t, _ in docs[:10])  # wiki markup filtered


def test_builtin_python_stdlib_is_this_pythons_modules_in_name_order():
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in lib.glob("*.py"))
    docs, _ = _read(OmegaConf.create([{"path": "builtin:python-stdlib", "text_key": "text", "max_docs": None}]))
    assert [o for _, o in docs] == [f"builtin:python-stdlib#{n}" for n in names]
    assert len(docs) > 100
    by_name = dict(zip(names, (t for t, _ in docs)))
    assert by_name["argparse.py"] == (lib / "argparse.py").read_text(encoding="utf-8")
    assert "class ArgumentParser" in by_name["argparse.py"]


def test_builtin_transformers_modeling_is_the_installed_modeling_files_in_path_order():
    from pathlib import Path

    import transformers

    root = Path(transformers.__file__).parent / "models"
    files = sorted(p for p in root.glob("*/modeling_*.py") if not p.name.startswith(("modeling_tf_", "modeling_flax_")))
    docs, _ = _read(OmegaConf.create([{"path": "builtin:transformers-modeling", "text_key": "text", "max_docs": 50}]))
    assert [o for _, o in docs] == [f"builtin:transformers-modeling#{p.parent.name}/{p.name}" for p in files[:50]]
    assert docs[7][0] == files[7].read_text(encoding="utf-8")
    bert = root / "bert" / "modeling_bert.py"
    assert bert in files and "class BertSelfAttention" in bert.read_text(encoding="utf-8")


def test_unknown_builtin():
    with pytest.raises(UserError, match="builtin:nope' is not a builtin corpus"):
        _read(OmegaConf.create([{"path": "builtin:nope", "text_key": "text", "max_docs": None}]))


@pytest.mark.parametrize(
    "n, fractions, expected",
    [(79, [0.9, 0.05, 0.05], [0, 71, 75, 79]), (10, [1.0, 0.0, 0.0], [0, 10, 10, 10]), (3, [0.34, 0.33, 0.33], [0, 1, 2, 3])],
)
def test_split_bounds(n, fractions, expected):
    assert split_bounds(n, fractions) == expected
