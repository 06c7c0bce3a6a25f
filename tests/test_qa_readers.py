"""Tests for the QA task readers: SQuAD v1.1/v2.0, TriviaQA, NQ-open and InstructRetro's format.

Every file is small and written here; each format is read into the expected questions,
golds and contexts, and each has a malformed file that must give a UserError naming the
file and the key.
"""

from __future__ import annotations

import json

import pytest

from retro_toolkit.collections.instruct.format import Context
from retro_toolkit.collections.qa.readers import read_qa_file
from retro_toolkit.collections.qa.tasks import TASKS, load_task
from retro_toolkit.errors import UserError

SQUAD_V1 = {"version": "1.1", "data": [
    {"title": "Python", "paragraphs": [
        {"context": "Python was created by Guido van Rossum.",
         "qas": [{"id": "q1", "question": "Who created Python?",
                  "answers": [{"text": "Guido van Rossum", "answer_start": 22},
                              {"text": "Guido van Rossum", "answer_start": 22},
                              {"text": "van Rossum", "answer_start": 28}]},
                 {"id": "q2", "question": "What was created?", "answers": [{"text": "Python", "answer_start": 0}]}]}]},
    {"title": "C", "paragraphs": [
        {"context": "C appeared in 1972.",
         "qas": [{"id": "q3", "question": "When did C appear?", "answers": [{"text": "1972", "answer_start": 14}]}]}]},
]}

SQUAD_V2 = {"version": "v2.0", "data": [
    {"title": "Rust", "paragraphs": [
        {"context": "Rust 1.0 was released in 2015.",
         "qas": [{"id": "a", "question": "When was Rust 1.0 released?", "is_impossible": False,
                  "answers": [{"text": "2015", "answer_start": 25}]},
                 {"id": "b", "question": "Who released Rust 2.0?", "is_impossible": True, "answers": [],
                  "plausible_answers": [{"text": "Rust", "answer_start": 0}]}]}]},
]}

TRIVIAQA = {"Data": [
    {"Question": "Which language has the Zen of Python?", "QuestionId": "tc_1",
     "Answer": {"Value": "Python", "Aliases": ["Python", "Python (language)", "CPython"],
                "NormalizedAliases": ["python", "python language", "cpython"], "Type": "WikipediaEntity"}},
    {"Question": "How many bits in a byte?", "QuestionId": "tc_2",
     "Answer": {"Value": "8", "Aliases": [], "NormalizedAliases": ["8"], "Type": "Numerical"}},
], "Domain": "Wikipedia", "Version": 1.0}

NQ_OPEN = [{"question": "who wrote the zen of python", "answer": ["Tim Peters"]},
           {"question": "when was python first released", "answer": ["1991", "February 1991"]}]


def write_json(path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading each format


def test_squad_v1_pretty_printed_object_reads_with_context_and_golds(tmp_path):
    # Pretty-printed (indent=2): the old reader took it for JSONL and called it "not valid JSON".
    qa = read_qa_file(write_json(tmp_path / "squad1.1.json", SQUAD_V1))
    assert qa.format == "squad" and qa.skipped == 0
    convs = qa.conversations
    assert [c.question for c in convs] == ["Who created Python?", "What was created?", "When did C appear?"]
    assert convs[0].answers == ["Guido van Rossum", "van Rossum"]  # duplicate answer texts collapse
    assert convs[2].answers == ["1972"]
    assert convs[0].contexts == [Context("Python", "Python was created by Guido van Rossum.")]
    assert convs[2].contexts[0].render() == "title: C, source: C appeared in 1972."
    assert "squad1.1.json" in convs[0].where and "id q1" in convs[0].where


def test_squad_v1_on_one_line_reads_the_same(tmp_path):
    qa = read_qa_file(write_json(tmp_path / "s.json", SQUAD_V1, indent=None))
    assert qa.format == "squad" and len(qa.conversations) == 3


def test_squad_v2_skips_unanswerable_questions_and_says_so(tmp_path):
    path = write_json(tmp_path / "squad2.0.json", SQUAD_V2)
    qa = read_qa_file(path)
    assert qa.skipped == 1 and [c.question for c in qa.conversations] == ["When was Rust 1.0 released?"]
    assert qa.conversations[0].answers == ["2015"]
    logged = []
    convs = load_task("squad2.0", str(path), log=logged.append)
    assert len(convs) == 1 and "skipped 1 unanswerable" in logged[0] and "squad" in logged[0]


def test_load_task_puts_the_squad_context_where_ctxs_go(tmp_path):
    convs = load_task("squad1.1", str(write_json(tmp_path / "s.json", SQUAD_V1)), max_samples=2)
    assert len(convs) == 2
    assert convs[0].messages == [("user", f"{TASKS['squad1.1']} Who created Python?")]
    assert convs[0].contexts[0].title == "Python" and convs[1].answers == ["Python"]


def test_triviaqa_golds_are_value_then_aliases(tmp_path):
    qa = read_qa_file(write_json(tmp_path / "tqa.json", TRIVIAQA))
    assert qa.format == "triviaqa"
    assert [c.question for c in qa.conversations] == ["Which language has the Zen of Python?",
                                                      "How many bits in a byte?"]
    assert qa.conversations[0].answers == ["Python", "Python (language)", "CPython"]  # Value once, then Aliases
    assert qa.conversations[1].answers == ["8"]
    assert qa.conversations[0].contexts == []


def test_nq_open_jsonl_and_json_list(tmp_path):
    for path in (write_jsonl(tmp_path / "nq.jsonl", NQ_OPEN), write_json(tmp_path / "nq.json", NQ_OPEN)):
        qa = read_qa_file(path)
        assert qa.format == "nq_open"
        assert [c.question for c in qa.conversations] == [r["question"] for r in NQ_OPEN]
        assert [c.answers for c in qa.conversations] == [["Tim Peters"], ["1991", "February 1991"]]


def test_instructretro_records_still_read(tmp_path):
    rec = {"question": "q?", "answers": ["a1", "a2"], "ctxs": [{"title": "T", "text": "body"}]}
    for path in (write_jsonl(tmp_path / "qa.jsonl", [rec, rec]), write_jsonl(tmp_path / "one.jsonl", [rec]),
                 write_json(tmp_path / "qa.json", [rec])):
        qa = read_qa_file(path)
        assert qa.format == "qa" and qa.conversations[0].answers == ["a1", "a2"]
        assert qa.conversations[0].contexts == [Context("T", "body")]


# ---------------------------------------------------------------- malformed files


def squad_without_qas():
    bad = json.loads(json.dumps(SQUAD_V1))
    del bad["data"][1]["paragraphs"][0]["qas"]
    return bad


def squad_with_empty_answers():
    bad = json.loads(json.dumps(SQUAD_V1))
    bad["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    return bad


def triviaqa_without_answer():
    bad = json.loads(json.dumps(TRIVIAQA))
    del bad["Data"][1]["Answer"]
    return bad


@pytest.mark.parametrize("name, content, message", [
    ("squad.json", squad_without_qas(), r"squad\.json: data\[1\]\.paragraphs\[0\]: missing key 'qas'"),
    ("squad.json", squad_with_empty_answers(), r"qas\[1\]: 'answers' is empty and the question is not marked"),
    ("squad.json", {"data": [{"title": "x", "paragraphs": [{"context": 5, "qas": []}]}]},
     r"paragraphs\[0\]: key 'context' must be a non-empty string"),
    ("tqa.json", triviaqa_without_answer(), r"tqa\.json: Data\[1\]: missing key 'Answer' \(TriviaQA's test files"),
    ("tqa.json", {"Data": [{"Question": "q", "Answer": {"Aliases": ["a"]}}]}, r"Data\[0\]\.Answer: missing key 'Value'"),
    ("other.json", {"version": "1.1", "articles": []}, r"other\.json is one JSON object with neither 'data'"),
])
def test_malformed_json_objects_name_the_file_and_key(tmp_path, name, content, message):
    path = write_json(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        read_qa_file(path)


def test_malformed_nq_open_names_the_line_and_key(tmp_path):
    path = write_jsonl(tmp_path / "nq.jsonl", [NQ_OPEN[0], {"question": "q", "answer": "not a list"}])
    with pytest.raises(UserError, match=r"nq\.jsonl:line 2: key 'answer' must be a JSON list"):
        read_qa_file(path)
    path = write_jsonl(tmp_path / "nq2.jsonl", [NQ_OPEN[0], {"question": "q", "answer": []}])
    with pytest.raises(UserError, match=r"nq2\.jsonl:line 2: key 'answer' must be a non-empty list"):
        read_qa_file(path)


def test_broken_json_object_reports_where(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text('{\n  "version": "1.1",\n  "data": [\n    {"title": "x",}\n  ]\n}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"squad\.json: not valid JSON \(.* at line 4"):
        read_qa_file(path)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(SQUAD_V1).replace("Python", "Pyth\u00f6n").encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.json is not UTF-8 \(byte \d+\): re-encode it as UTF-8"):
        read_qa_file(path)
    with pytest.raises(UserError, match=r"nope\.json does not exist"):
        read_qa_file(tmp_path / "nope.json")
