"""Progress lines for long work: count, rate, ETA.

Jobs run under NeMo-Run, torchrun and Slurm, whose logs are files, so progress is
printed as whole lines (at most one every `every` seconds) rather than a redrawn bar.
Only the main rank prints.
"""

from __future__ import annotations

import sys
import time


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "items",
        enabled: bool = True,
        every: float = 2.0,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.enabled, self.every = enabled, every
        self.count = 0
        self.extra: dict[str, float] = {}
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1, **extra: float) -> None:
        self.count += n
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print(final=False)

    def close(self) -> float:
        """Print the final line; return the elapsed seconds."""
        self._print(final=True)
        return time.monotonic() - self.start

    def _print(self, final: bool) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.count / elapsed
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        parts = [f"[{self.label}] {done} {self.unit}"]
        if self.total:
            parts.append(f"({100.0 * self.count / max(self.total, 1):.1f}%)")
        parts.append(f"{_fmt_count(rate)} {self.unit}/s")
        for k, v in self.extra.items():
            parts.append(f"{_fmt_count(v)} {k} ({_fmt_count(v / elapsed)}/s)")
        if final:
            parts.append(f"done in {_fmt_time(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {_fmt_time((self.total - self.count) / rate)}")
        print(" ".join(parts), file=sys.stdout, flush=True)
