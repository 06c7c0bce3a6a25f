"""Recipes and yaml/ pieces read safely: bounded in size and in alias expansion, no key twice.

    read_yaml(path, "recipe")       # a dict, or UserError naming the file, line and fix

PyYAML's safe_load keeps the last of two equal keys without a word, and expands nested
aliases (an "alias bomb") into gigabytes before anything can look at the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from retro_toolkit.errors import UserError

# Recipes and yaml/ pieces are a few KB; these bounds refuse a wrong file or an alias bomb
# (nested anchors whose expansion doubles at every level) before it costs minutes and gigabytes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(Exception):
    """A problem found while loading; read_yaml adds the file to the message."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The first call on a node sees its own pairs; later calls (it is merged elsewhere
        # with `<<: *anchor`) see them already flattened with the merged ones.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            _refuse_duplicate_keys(node)
        super().flatten_mapping(node)


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue  # `<<` merges may repeat keys on purpose: the mapping's own key wins
        key = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if key in first_line:
            shown = key_node.value if len(key_node.value) <= 60 else key_node.value[:57] + "..."
            raise YamlProblem(
                f"key '{shown}' appears twice in the same mapping, on line {first_line[key]} and line {line} "
                "(YAML would silently keep only the last one). Delete or rename one of them."
            )
        first_line[key] = line


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes the document becomes once every alias is expanded, counted without expanding:
    each node's size is computed once and reused wherever an alias points to it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise YamlProblem(
                f"the alias on line {node.start_mark.line + 1} refers to a list or mapping that contains it, "
                "so it never ends. Write the value out instead of the recursive alias."
            )
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise YamlProblem(
                    f"it holds more than {limit:,} values once its aliases (*name) are expanded, far more than "
                    "any recipe needs (aliases of aliases multiply: an 'alias bomb'). Remove the nested aliases, "
                    "or keep long lists out of the recipe."
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def load_yaml_text(text: str) -> Any:
    """Parse one YAML document safely: no duplicate keys, bounded alias expansion.
    Raises yaml.YAMLError for syntax errors and YamlProblem for the rest."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_YAML_NODES)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlProblem("it is nested too deeply (lists or mappings inside each other hundreds of levels down). "
                           "A recipe is a few levels deep.") from None
    finally:
        loader.dispose()


def _read_bounded(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}.") from None
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(
            f"{what} {path} is larger than {MAX_YAML_BYTES:,} bytes; recipes and yaml/ pieces are a few KB. "
            "Check that this is the recipe you meant (not a data file), or split it into yaml/ pieces."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A recipe or yaml/ piece as a dict; every problem is a UserError naming the file."""
    text = _read_bounded(path, what)
    try:
        data = load_yaml_text(text)
    except YamlProblem as e:
        raise UserError(f"{what} {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{what} {path} is not valid YAML ({problem} at{where}). Fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of keys to values, not a {type(data).__name__}.")
    return data
