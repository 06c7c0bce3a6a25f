"""Instruction data: readers and their errors, the prompt format, answer-only masks, blends."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from retro_toolkit.collections.instruct import Conversation, InstructBlend, encode_conversation, encode_prompt
from retro_toolkit.collections.instruct.dataset import SftDataset
from retro_toolkit.collections.instruct.format import Context
from retro_toolkit.collections.instruct.readers import read_dataset
from retro_toolkit.collections.qa.tasks import TASKS, load_task
from retro_toolkit.collections.text.tokenizer import Tokenizer, workdir_tokenizer
from retro_toolkit.data import BUILTIN_FILES
from retro_toolkit.errors import UserError

MULTI = {"messages": [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What does the pass statement do?"},
    {"role": "assistant", "content": "Nothing: it is a placeholder."},
    {"role": "user", "content": "And break?"},
    {"role": "assistant", "content": "It leaves the innermost loop."},
]}


@pytest.fixture(scope="module")
def tok(smoke_local) -> Tokenizer:
    return workdir_tokenizer(smoke_local)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    out, start = [], None
    for i, v in enumerate(mask + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def test_the_loss_mask_covers_exactly_the_assistant_answers_and_the_final_end(tmp_path, tok):
    conv = read_dataset(write_jsonl(tmp_path / "c.jsonl", [MULTI]), "conversation")[0]
    ids, mask = encode_conversation(conv, tok)
    assert len(ids) == len(mask)
    spans = runs(mask)
    assert len(spans) == 2  # one per assistant turn
    first, last = spans
    assert tok.decode(ids[first[0] : first[1]]).strip() == "Nothing: it is a placeholder."
    assert ids[last[1] - 1] == tok.eod_id and last[1] == len(ids)
    assert tok.decode(ids[last[0] : last[1] - 1]).strip() == "It leaves the innermost loop."
    # Everything else (system, user turns, "Assistant:" markers) carries no loss.
    text_without = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "Answer in one line." in text_without and "And break?" in text_without
    assert "placeholder" not in text_without and "innermost" not in text_without
    # Generation's prompt is exactly the tokens in front of the last answer.
    assert encode_prompt(conv, tok) == ids[: last[0]]


def test_the_prompt_format_places_system_context_and_turns(tok):
    conv = load_task("nq", str(BUILTIN_FILES["builtin:smoke-qa"]), max_samples=1)[0]
    conv = Conversation(conv.messages, contexts=[Context("T", " body ")])
    text = tok.decode(encode_prompt(conv, tok))
    assert text.startswith("System:")
    assert text.index("title: T, source: body") < text.index("User:") < text.rindex("Assistant:")
    assert text.rstrip().endswith("Assistant:")


def test_sft_samples_shift_labels_and_mask_padding(tmp_path, tok):
    convs = read_dataset(write_jsonl(tmp_path / "c.jsonl", [MULTI]), "conversation")
    blend = InstructBlend(["c"], [1], [1.0], 3, seed=1)
    n = 128
    data = SftDataset([convs], blend, tok, n, 64, 2, 128, retrieval=False, system="S")
    s = data[0]
    ids, mask = encode_conversation(convs[0], tok, "S")
    assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (n,)
    assert list(s["tokens"][: len(ids)]) == ids and list(s["labels"][: len(ids) - 1]) == ids[1:]
    assert list(s["loss_mask"][: len(ids) - 1]) == mask[1:]
    assert not s["loss_mask"][len(ids) - 1 :].any()  # padding carries no loss
    short = SftDataset([convs], blend, tok, 16, 8, 2, 16, retrieval=False, system="S")[0]
    assert short["tokens"].shape == (16,) and list(short["tokens"]) == ids[:16]


def test_sft_neighbours_are_the_contexts_after_the_first(tmp_path, tok):
    rec = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "top", "text": "in the prompt"},
                                                         {"title": "second", "text": "to the encoder"}]}
    convs = read_dataset(write_jsonl(tmp_path / "qa.jsonl", [rec]), "qa")
    data = SftDataset([convs], InstructBlend(["q"], [1], [1.0], 1, 0), tok, 128, 64, 2, 32, True, "S")
    nb = data[0]["neighbor_tokens"]
    assert nb.shape == (2, 2, 32)
    assert (nb[:, 1] == -1).all()  # only one context left for k = 2
    first = [t for t in nb[0, 0] if t != tok.pad_id]
    assert tok.decode(first) == "title: second, source: to the encoder"
    assert (nb[0] == nb[1]).all()  # the same neighbours for every chunk


def test_blend_proportions_over_ten_thousand_draws_match_the_weights():
    weights = [0.020, 0.020, 0.010, 0.020, 0.020, 0.010, 0.050, 0.817, 0.033]  # InstructRetro's open blend
    blend = InstructBlend([f"d{i}" for i in range(9)], [50] * 9, weights, 10_000, seed=3)
    counts = Counter(blend[i][0] for i in range(len(blend)))
    for d, w in enumerate(weights):
        assert abs(counts[d] / 10_000 - w / sum(weights)) < 0.02 * w / sum(weights) + 1e-4
    # Within a dataset every record comes once before any repeats.
    firsts = [blend[i][1] for i in range(len(blend)) if blend[i][0] == 7][:50]
    assert sorted(firsts) == list(range(50))


@pytest.mark.parametrize("names,sizes,weights,match", [
    ([], [], [], "blend is empty"),
    (["a", "b"], [3, 3], [0.0, 0.0], "sum to 0.0"),
    (["a", "b"], [3, 3], [1.0, -1.0], "must be >= 0: b"),
    (["a", "b"], [3, 0], [1.0, 1.0], "b has weight 1.0 but no records"),
])
def test_bad_blends_are_named(names, sizes, weights, match):
    with pytest.raises(UserError, match=match):
        InstructBlend(names, sizes, weights, 10, 0)


@pytest.mark.parametrize("fmt,records,match", [
    ("qa", [{"question": "q", "answers": ["a"]}, {"question": "q2"}], r"record 2: missing field 'answers'"),
    ("qa", [{"answers": ["a"]}], r"record 1: missing field 'question'"),
    ("qa", [{"question": "q", "answers": []}], "'answers' must be a non-empty list"),
    ("qa", [{"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}], r"ctxs\[0\]: missing field 'text'"),
    ("conversation", [{"messages": []}], "'messages' must be a non-empty list"),
    ("conversation", [{"messages": [{"role": "assistant", "content": "hi"}]}], "expected a user message"),
    ("conversation", [{"messages": [{"role": "user", "content": "hi"}]}], "must end with an assistant message"),
    ("conversation", [{"messages": [{"role": "bot", "content": "x"}]}], "role 'bot' is not one of"),
    ("prompt_response", [{"prompt": "p", "response": ""}], "'response' must be a non-empty string"),
])
def test_bad_records_name_the_record_and_field(tmp_path, fmt, records, match):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records) if fmt == "qa" else "".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match=match):
        read_dataset(path, fmt)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_dataset(tmp_path / "nope.jsonl", "conversation")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_dataset(bad, "prompt_response")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_dataset(broken, "prompt_response")
    with pytest.raises(UserError, match="unknown instruction data format 'chat'"):
        read_dataset(broken, "chat")


def test_boolq_answers_and_task_prompts(tmp_path):
    path = tmp_path / "boolq.jsonl"
    path.write_text(json.dumps({"question": "is water wet", "answers": True}) + "\n")
    conv = load_task("boolq", str(path))[0]
    assert conv.answers == ["yes"] and conv.question == "is water wet"
    assert conv.messages == [("user", f"{TASKS['boolq']} is water wet")]


def test_the_bundled_smoke_sets_read_cleanly():
    qa = read_dataset(BUILTIN_FILES["builtin:smoke-qa"], "qa")
    assert len(qa) == 20 and all(q.answers for q in qa)
    inst = read_dataset(BUILTIN_FILES["builtin:smoke-instruct"], "conversation")
    assert len(inst) >= 50
    assert any(len(c.messages) > 2 for c in inst) and any(c.system for c in inst)
    assert np.mean([len(c.messages) for c in inst]) >= 2
