"""A corpus document's bytes as text under the recipe's data.on_invalid_utf8, and
`ReadStats`, the counts a corpus read keeps (bad documents replaced among them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retro_toolkit.errors import UserError


@dataclass
class ReadStats:
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    per_source: list[int] = field(default_factory=list)


def decode(raw: bytes, where: str, policy: str, stats: ReadStats) -> str:
    """`raw` as UTF-8; invalid bytes are an error naming `where`, or with policy "replace"
    become U+FFFD and count in stats.invalid_utf8_replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "replace":
            stats.invalid_utf8_replaced += 1
            return raw.decode("utf-8", errors="replace")
        line = raw.count(b"\n", 0, e.start)
        at = where if line == 0 else f"{where} (line {line + 1} of the document)"
        raise UserError(
            f"{at}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}). Fix the file, or set "
            "data.on_invalid_utf8=replace to replace bad bytes with U+FFFD."
        ) from None
