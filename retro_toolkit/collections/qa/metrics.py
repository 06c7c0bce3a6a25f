"""Exact match and token F1 against several gold answers (SQuAD's normalisation).

normalize: lowercase, drop punctuation (every Unicode punctuation character), drop the
articles a/an/the as whole words, collapse whitespace. Each metric is the maximum over
the gold answers, so a prediction matching any accepted answer scores 1.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    out = [golds] if isinstance(golds, str) else list(golds)
    if not out:
        raise ValueError("at least one gold answer is needed")
    return out


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(g) for g in _golds(golds)))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1; one empty: 0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    return max(_f1(prediction, g) for g in _golds(golds))
