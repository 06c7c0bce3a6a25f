"""`retro-run inspect WORKDIR {stats | chunk N | neighbours SPLIT N}`: look inside a work
directory's retrieval database."""

from __future__ import annotations

import argparse

NAME = "inspect"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    i = sub.add_parser(NAME, help="look inside a work directory's retrieval database",
                       description="stats: counts, index type, sizes; chunk N: a database chunk's text; "
                       "neighbours SPLIT N: a query chunk of SPLIT and its neighbours with continuations.")
    i.add_argument("workdir")
    i.add_argument("what", nargs="+", metavar="stats | chunk N | neighbours SPLIT N")
    return i


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.errors import UserError

    what = args.what
    usage = "use: inspect WORKDIR stats | chunk N | neighbours SPLIT N"
    kind = what[0]
    words = {"stats": 1, "chunk": 2, "neighbours": 3, "neighbors": 3}
    if words.get(kind) != len(what):
        raise UserError(f"inspect: '{' '.join(what)}' is not understood; {usage}.")
    try:
        n = int(what[-1]) if kind != "stats" else 0
    except ValueError:
        raise UserError(f"inspect: N must be a number, not '{what[-1]}'; {usage}.") from None
    from retro_toolkit.collections.retrieval.inspect_db import Inspector

    ins = Inspector(args.workdir)
    print(ins.stats() if kind == "stats" else ins.chunk(n) if kind == "chunk" else ins.neighbours(what[1], n))
    return 0
