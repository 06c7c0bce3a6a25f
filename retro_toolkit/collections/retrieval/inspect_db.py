"""`retro-run inspect WORKDIR ...`: look inside a retrieval database without writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import blocks, chunk_db
from retro_toolkit.collections.retrieval.build_db import chunk_text, database_tokens
from retro_toolkit.collections.retrieval.neighbors import NEIGHBORS_DIR, NEIGHBORS_META, load_neighbors
from retro_toolkit.collections.text.token_stream import CORPUS_DIR, TokenStream
from retro_toolkit.collections.text.tokenizer import workdir_tokenizer
from retro_toolkit.core import files
from retro_toolkit.errors import UserError


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])


class Inspector:
    def __init__(self, workdir: str) -> None:
        self.w = Path(workdir)
        if not (self.w / NEIGHBORS_META).is_file():
            raise UserError(f"{self.w} has no finished build_db ({self.w / NEIGHBORS_META} is missing).")
        self.meta = files.read_json(self.w / NEIGHBORS_META)
        self.tok = workdir_tokenizer(self.w)
        self.db = chunk_db.load(self.w / chunk_db.CHUNKS_FILE)
        self.tokens = database_tokens(self.w, self.db)

    def _check(self, n: int, size: int, what: str) -> None:
        if not 0 <= n < size:
            raise UserError(f"{what} {n} is out of range: there are {size} (0..{size - 1}).")

    def chunk(self, n: int) -> str:
        self._check(n, len(self.db), "chunk")
        s, e = int(self.db.chunk_start[n]), int(self.db.chunk_end[n])
        part = self.db.parts[int(np.searchsorted(self.db.part_chunks, n, side="right") - 1)]
        return (f"chunk {n}: {part} document {int(self.db.chunk_doc[n])}, tokens {s}..{e} ({e - s})\n"
                + _indent(chunk_text(self.tok, self.tokens[s:e])))

    def neighbours(self, split: str, n: int) -> str:
        if split not in self.meta["splits"]:
            raise UserError(f"no neighbours for split '{split}'; built: {', '.join(self.meta['splits'])}.")
        s = self.meta["splits"][split]
        self._check(n, s["query_chunks"], f"{split} query chunk")
        m, bs = self.meta["chunk_length"], self.meta["block_size"]
        start = n // bs * bs
        block = blocks.read(blocks.path(self.w / NEIGHBORS_DIR / split, start, min(start + bs, s["query_chunks"]),
                                        s["query_chunks"]))
        if block is None:
            raise UserError(f"the neighbour block holding {split} chunk {n} is missing or damaged: rerun build_db.")
        stream = TokenStream(self.w / CORPUS_DIR, split)
        out = [f"{split} query chunk {n} (tokens {n * m}..{min((n + 1) * m, len(stream))}):",
               _indent(chunk_text(self.tok, stream.tokens[n * m:(n + 1) * m])),
               f"its neighbour candidates in rank order (a training sample drops those from its own documents "
               f"and keeps the first {self.meta['num_neighbors']}):"]
        r = 2 * m
        toks = chunk_db.neighbor_tokens(self.db, self.tokens, block[n - start], r, self.tok.pad_id)
        for j, (cid, t) in enumerate(zip(block[n - start], toks)):
            if cid < 0:
                out.append(f"neighbour {j}: none")
                continue
            t = t[t != self.tok.pad_id]
            out.append(f"neighbour {j}: chunk {cid} (document {int(self.db.chunk_doc[cid])}), with continuation:")
            out.append(_indent(chunk_text(self.tok, t)))
        return "\n".join(out)

    def stats(self) -> str:
        meta = files.read_json(self.w / CORPUS_DIR / "meta.json")
        lines = [f"work directory {self.w}", f"tokenizer: vocab {self.tok.vocab_size}"]
        for split, v in meta["splits"].items():
            lines.append(f"corpus {split}: {v['documents']} documents, {v['tokens']} tokens")
        idx_files = list((self.w / "index").glob("*/added.faissindex"))
        size = sum(f.stat().st_size for f in idx_files)
        lines.append(f"database: {len(self.db)} chunks of up to {self.meta['chunk_length']} tokens, "
                     f"from {len(self.db.doc_offsets) - 1} documents ({', '.join(self.db.parts)})")
        lines.append(f"index: {self.meta['index']}, {size / 2**20:.1f} MiB")
        for split, s in self.meta["splits"].items():
            nb = load_neighbors(self.w, split)
            lines.append(f"neighbours {split}: {s['query_chunks']} query chunks x {nb.shape[1]} candidates, "
                         f"{(nb < 0).mean() * 100:.1f}% missing (-1)")
        return "\n".join(lines)
