"""InstructRetro's prompt format and the answer-only loss mask.

A conversation renders as

    System: <system prompt>

    title: <title>, source: <text>          (the top-1 context, when there is one)

    User: <question>

    Assistant: <answer>

    User: ...

    Assistant: <last answer><end of document>

Each piece is tokenised on its own and the pieces are concatenated, so the tokens of an
answer are the same whether it is a training target or what generation produces after
"Assistant:". The loss mask is 1 on exactly the assistant answers' tokens and the
end-of-document token after the last answer (which teaches the model to stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DEFAULT_SYSTEM = ("A conversation between a user and an AI assistant. The assistant answers the user's "
                  "questions accurately and briefly, from the context when one is given, and says when the "
                  "context does not hold the answer.")


@dataclass
class Context:
    title: str
    text: str

    def render(self) -> str:
        text = self.text.strip()
        return f"title: {self.title}, source: {text}" if self.title else f"source: {text}"


@dataclass
class Conversation:
    messages: list[tuple[str, str]]  # (role, content), role "user" or "assistant", alternating from "user"
    system: Optional[str] = None
    contexts: list[Context] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # gold answers (QA records)
    question: str = ""  # the QA record's question as written (the user turn may add an instruction)
    where: str = ""  # "file:record", for messages


def _pieces(conv: Conversation, system: str, with_last_answer: bool) -> list[tuple[str, bool]]:
    out = [(f"System: {conv.system or system}\n\n", False)]
    if conv.contexts:
        out.append((conv.contexts[0].render() + "\n\n", False))
    messages = conv.messages if with_last_answer else conv.messages[:-1] if conv.messages[-1][0] == "assistant" \
        else conv.messages
    for i, (role, content) in enumerate(messages):
        if role == "user":
            out.append((f"User: {content}\n\nAssistant:", False))
        else:
            out.append((f" {content}", True))
            if i < len(messages) - 1:
                out.append(("\n\n", False))
    return out


def encode_conversation(conv: Conversation, tokenizer, system: str = DEFAULT_SYSTEM) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation ending in an assistant answer."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_answer in _pieces(conv, system, with_last_answer=True):
        toks = tokenizer.encode([text])[0]
        ids += toks
        mask += [int(is_answer)] * len(toks)
    ids.append(tokenizer.eod_id)
    mask.append(1)
    return ids, mask


def encode_prompt(conv: Conversation, tokenizer, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Token ids up to the last "Assistant:", for generation (a final assistant turn is left out)."""
    ids: list[int] = []
    for text, _ in _pieces(conv, system, with_last_answer=False):
        ids += tokenizer.encode([text])[0]
    return ids
