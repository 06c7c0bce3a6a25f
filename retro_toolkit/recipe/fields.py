"""Field helpers for the schema's dataclasses: what a key holds beyond its type.

`bounded` gives an integer key its allowed range and the reason a user reads for the upper
end; the upper ends are far beyond any real run, so they only catch typos (an extra zero,
1e30) at validation instead of as a crash or a huge allocation inside a stage. `filepath` marks
a key holding a file or folder: validation makes it absolute (jobs start in other
directories), leaving builtin:<name> and the key's own words (e.g. "sft") as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

INT32 = 2**31 - 1
STEPS = 10**9
VOCAB = 10_000_000
WHY_VOCAB = (f"no real vocabulary has more than {VOCAB:,} entries (the embedding has a row per entry; "
             "token ids are stored as uint16/uint32)")
WHY_SHAPE = "far beyond any real model (check for a typo)"
WHY_STEPS = "a billion steps is far beyond any real run (check for a typo)"
WHY_BATCH = "far beyond what fits in memory (check for a typo)"
WHY_SEED = "seeds are 32-bit (SentencePiece, numpy and torch take them)"
WHY_COUNT = "far beyond any real data set (check for a typo)"
WHY_CLUSTER = "far beyond any real machine or cluster (check for a typo)"
# Every integer without bounds is handed to numpy or torch at some point: it must fit 64 bits.
INT64 = (-(2**63), 2**63 - 1, "integers must fit 64 bits")


def bounded(default: Any, lo: int, hi: int, why: str) -> Any:
    """An integer field (or an Optional one) holding lo..hi, both inclusive."""
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi, why)})


def filepath(default: Any, words: tuple[str, ...] = ()) -> Any:
    """A field holding a path; `words` are the values that name something else."""
    return dataclasses.field(default=default, metadata={"path": words})


def redefault(cls: type, name: str, default: Any) -> Any:
    """Field `name` of dataclass `cls` with another default (for a subclass), its metadata kept."""
    return dataclasses.field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def bounds(f: dataclasses.Field) -> tuple[int, int, str]:
    return f.metadata.get("bounds", INT64)
