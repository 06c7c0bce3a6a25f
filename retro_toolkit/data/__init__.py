"""Small data files written for this project, addressed in recipes as builtin:<name>.

  builtin:smoke-instruct   about 80 conversations about Python (instruction tuning on the smoke corpus)
  builtin:smoke-qa         20 questions whose answers are spans of CPython's pydoc topics
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
BUILTIN_FILES = {
    "builtin:smoke-instruct": HERE / "smoke_instruct.jsonl",
    "builtin:smoke-qa": HERE / "smoke_qa.json",
}


def data_file(path: str) -> Path:
    """A recipe's data path, with builtin:<name> resolved to the bundled file."""
    return BUILTIN_FILES[path] if path in BUILTIN_FILES else Path(path)
