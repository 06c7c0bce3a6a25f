"""Where recipes and yaml/ pieces are found: the checkout (editable install) or the wheel."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]


def builtin_root(kind: str) -> Path:
    """`recipes` or `yaml`: inside the installed wheel, else at the top of the checkout."""
    installed = _PKG / f"_{kind}"
    return installed if installed.is_dir() else _PKG.parent / kind


def yaml_roots(recipe_file: Path | None) -> list[Path]:
    """A recipe's own tree first (recipes/x.yaml next to yaml/), then the builtin pieces."""
    roots: list[Path] = []
    if recipe_file is not None:
        roots += [recipe_file.parent.parent / "yaml", recipe_file.parent / "yaml"]
    roots.append(builtin_root("yaml"))
    seen: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r.is_dir() and r not in seen:
            seen.append(r)
    return seen


def groups(roots: list[Path]) -> set[str]:
    return {p.name for r in roots for p in r.iterdir() if p.is_dir()}


def describe(path: Path) -> str:
    """One-line description: the first `# ` comment line of a YAML file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("#"):
                    return line.lstrip("#").strip()
                if line:
                    break
    except OSError:
        pass
    return ""
