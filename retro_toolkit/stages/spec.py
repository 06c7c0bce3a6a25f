"""What the runner knows of a stage: its recipe section, its checks, its place in the pipeline.

`config_keys` are the recipe keys whose values go into the stage's fingerprint: a change to
any of them (or to an upstream stage's fingerprint) reruns the stage. Bump `version` when
a stage's output format or semantics change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class StageSpec:
    name: str
    # The stage's own recipe section (its dataclass is in the stage's file; recipe/schema.py lists them).
    section: Optional[str]
    depends_on: tuple[str, ...]
    config_keys: tuple[str, ...]
    entry: str  # "module:function" run inside the stage's job
    # One line for listings: the leaf's docstring ("Stage `name`: what it does.") is enough.
    summary: str
    version: int = 1
    # Stages whose outputs this one reads when the recipe runs them (ordering and fingerprint).
    after: tuple[str, ...] = ()
    # Keys added after work directories existed, with the default that reproduces the old
    # behaviour: at that default they stay out of the fingerprint, so those stay current.
    added_keys: tuple[tuple[str, object], ...] = ()
    # What the stage needs instead of depends_on when model.arch is gpt (no retrieval database).
    gpt_depends_on: tuple[str, ...] = ()
    # Checks the types cannot express, on the whole checked recipe (a dict).
    check: Optional[Callable[[dict[str, Any]], None]] = None
    # File checks before anything is written, on the checked recipe (`retro-run validate` too).
    preflight: Optional[Callable[[Any], None]] = None
    # (recipe key, path) of every file or folder the stage's job opens besides the work
    # directory: a container job must see each at the same path.
    reads: Optional[Callable[[Any], list[tuple[str, Any]]]] = None
    # Check the section only when the recipe runs the stage: its defaults are placeholders
    # (an empty task list) that only a run must replace.
    gated: bool = False
    # (key, default) that update the stage's output without changing what trained models read
    # from it: the stages downstream keep their fingerprint (runner/manifest.py).
    update_keys: tuple[tuple[str, object], ...] = ()
    # (key, value): where the recipe sets it, the stages trained on this one follow every update
    # (they rerun) instead of keeping what they read.
    follow_updates: Optional[tuple[str, object]] = None
    # Reads the current retrieval database (reruns when it is updated, and records its version).
    reads_database: bool = False
    # "module:function" run inside the job before the stage's manifest is removed: bad input it
    # finds (a UserError) leaves the work directory as it was, the manifest included.
    precheck: Optional[str] = None

    def __post_init__(self) -> None:
        line = self.summary.strip().splitlines()[0].removeprefix(f"Stage `{self.name}`: ").rstrip(".")
        object.__setattr__(self, "summary", line)

    def needs(self, arch: str) -> tuple[str, ...]:
        """The stages a recipe must list for this one, for a model of `arch`."""
        return self.gpt_depends_on if arch == "gpt" and self.gpt_depends_on else self.depends_on

    def upstream(self, stages) -> tuple[str, ...]:
        """The stages this one waits for in a recipe running `stages`."""
        direct = [d for d in self.depends_on if d in stages] or [d for d in self.gpt_depends_on if d in stages]
        return tuple(direct + [d for d in self.after if d in stages])

