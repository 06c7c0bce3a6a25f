"""Exact match and token F1 against several gold answers, by the SQuAD v1.1 rules.

normalize: lower-case; delete every character of ASCII `string.punctuation` (so "$5" is
"5", "a+b" is "ab"; Unicode punctuation such as « » or an em dash stays); delete the
articles a/an/the as whole words; collapse whitespace. These are the official SQuAD v1.1
evaluation script's rules, which InstructRetro's QA evaluation also used, so scores
compare with the papers'.

exact_match: 1 when the normalised strings are equal (two empty strings are equal).
f1_score: token-bag F1; 0 whenever prediction and gold share no token, which includes
both normalising to nothing. Each metric is the maximum over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation (see the module docstring)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    out = [golds] if isinstance(golds, str) else list(golds)
    if not out:
        raise ValueError("at least one gold answer is needed")
    return out


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold, else 0.0."""
    p = normalize(prediction)
    return float(any(p == normalize(g) for g in _golds(golds)))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """The best token F1 of the prediction against any gold."""
    return max(_f1(prediction, g) for g in _golds(golds))
