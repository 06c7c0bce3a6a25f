"""db/version.json: which database a work directory holds now.

    {"version": 3, "key": "<16 hex>", "chunks": 51234, "removed_docs": 2, "parts": [...],
     "history": [{"version": 1, ...}, {"version": 2, ...}, {"version": 3, ...}]}

The number goes up by one whenever build_db fills an index whose content differs from the
last one (its key covers every live chunk's embedding and the trained index); a rebuild of
the same content keeps it. build_db writes it once the index is filled, so a server that
watches it (retro-run serve) reloads a whole database. Eval results, QA scores, packages and
the neighbours a model trained on record the version they used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retro_toolkit.core import files

VERSION_FILE = "db/version.json"


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return files.read_json(Path(workdir) / VERSION_FILE)
    except (OSError, ValueError):
        return None  # a database built before versions were kept


def brief(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """{"version", "key"} of the work directory's database, for a consumer to record."""
    v = read(workdir)
    return {"version": v["version"], "key": v["key"]} if v else None


def record(workdir: str | os.PathLike, key: str, db) -> dict[str, Any]:
    """Write the version of the database whose filled index has content key `key` (rank 0)."""
    old = read(workdir) or {}
    if old.get("key") == key[:16]:
        return old
    entry = {"version": old.get("version", 0) + 1, "key": key[:16], "chunks": db.live_chunks,
             "removed_docs": db.removed_docs, "parts": list(db.parts)}
    data = {**entry, "history": old.get("history", []) + [entry]}
    files.write_json(Path(workdir) / VERSION_FILE, data)
    return data
