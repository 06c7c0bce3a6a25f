"""The package's shape: what may import what, and how long a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "retro_toolkit"
MAX_LINES = 300


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def test_no_collection_or_stage_imports_the_runner_or_the_cli():
    bad = {}
    for folder in ("collections", "stages", "recipe", "checkpoint"):
        for f in (PACKAGE / folder).rglob("*.py"):
            hits = sorted(m for m in _imports(f) if m.startswith(("retro_toolkit.runner", "retro_toolkit.cli")))
            if hits:
                bad[str(f.relative_to(PACKAGE))] = hits
    assert not bad, bad


def test_stage_leaves_import_no_torch_at_module_level():
    """Validation and planning import every leaf; the stage's own code is imported in its job."""
    heavy = ("torch", "megatron", "faiss", "transformers", "retro_toolkit.collections.retro")
    bad = {}
    for f in [*(PACKAGE / "stages").glob("*.py"), *(PACKAGE / "recipe").glob("*.py")]:
        top = {m for node in ast.parse(f.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
               for m in _imports_of(node)}
        hits = sorted(m for m in top if m.startswith(heavy))
        if hits:
            bad[f.name] = hits
    assert not bad, bad


def _imports_of(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""]


def test_no_module_is_over_300_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by idea: {long}"
