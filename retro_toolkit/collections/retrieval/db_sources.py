"""What the database holds besides the train split, and what was taken out of it.

    db/extra/<key>/        one token stream per corpus of retrieval.extra_sources
    db/removals/<key>.json the digest and length of each document of a removal corpus (its
                           tokens are dropped once digested: they are the text taken out)

Each extra corpus is its own part of the chunk DB, keyed by the source entry, the file's size
and modification time, and the tokenizer, so adding or replacing one re-tokenizes and
re-embeds that corpus alone. A document is taken out when a document of a removal corpus has
exactly its tokens (end of document aside). Its chunks become empty rows of the chunk DB, and
in an extra corpus its tokens are overwritten with the pad id, so its text is gone from the
database's files; a train document's text stays in corpus/, the data the model was trained on.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from retro_toolkit.collections.retrieval import chunk_db
from retro_toolkit.collections.retrieval.keys import sha
from retro_toolkit.collections.text import token_stream as ts
from retro_toolkit.collections.text.tokenizer import Tokenizer
from retro_toolkit.core import dist, files
from retro_toolkit.core.stage import StageContext
from retro_toolkit.errors import UserError

EXTRA_DIR = "db/extra"
REMOVALS_DIR = "db/removals"
RETIRED = "retired:"


def _stamp(path: str) -> list:
    """Size and modification time of a source's files: a file replaced in place is a new corpus."""
    if path.startswith("builtin:"):
        return []
    p = Path(path)
    found = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else \
        sorted(q for q in p.parent.glob(p.name + ".*") if q.is_file())  # a Megatron PREFIX
    return [(str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in found]


def source_key(src, tok: Tokenizer) -> str:
    return sha(dict(src), _stamp(str(src.path)), tok.sha256)[:16]


def _tokenized(ctx: StageContext, tok: Tokenizer, src, folder: Path, key: str, label: str) -> ts.TokenStream:
    """One source tokenized into folder (stream "docs"), every rank its shards; reused while its
    key matches and no document blanked in it is wanted back."""
    from retro_toolkit.collections.text.sources import check_token_sources
    from retro_toolkit.collections.text.tokenize_shards import ShardedRead

    meta_file = folder / "meta.json"
    stale = dist.broadcast_object(not meta_file.is_file() or files.read_json(meta_file).get("key") != key)
    if stale:
        ctx.log(f"tokenizing {label} ({src.path})")
        if ctx.env.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            check_token_sources([src], tok, label)
        dist.barrier()
        data = ctx.recipe.data
        read = ShardedRead([src], data.on_invalid_utf8, None, data.shard_mb, ctx.env, label, tok.eod_id)
        dtype = ts.dtype_for_vocab(tok.vocab_size)
        progress = ctx.progress(f"tokenize {label}", read.my_units(), "documents")
        read.tokenize(tok, dtype, folder, ("docs",), lambda i: "docs", ctx.recipe.data.tokenize_batch_docs, progress)
        progress.close()
        dist.barrier()
        if ctx.env.is_main:
            counts = read.merge(folder, "docs")
            shutil.rmtree(folder / ".parts")
            files.write_json(meta_file, {"key": key, "dtype": dtype.name, "special_ids": tok.special_ids(),
                                         "tokenizer_sha256": tok.sha256, "splits": {"docs": counts}, "blanked": {}})
    dist.barrier()
    return ts.TokenStream(folder, "docs")


def extra_streams(ctx: StageContext, tok: Tokenizer) -> dict[str, ts.TokenStream]:
    """Every extra corpus's stream by part name ("extra:<key>"), in recipe order."""
    out = {}
    for i, src in enumerate(ctx.recipe.retrieval.extra_sources):
        key = source_key(src, tok)
        out[f"extra:{key}"] = _tokenized(ctx, tok, src, ctx.workdir / EXTRA_DIR / key, key, f"retrieval.extra_sources[{i}]")
    return out


Removal = tuple[str, list[str], list[int]]  # label, each document's digest and token count


def removal_digests(ctx: StageContext, tok: Tokenizer) -> tuple[list[Removal], list[Path]]:
    """Each removal corpus's documents as digests, and the records this call wrote (to delete
    if the removal is refused, so a refused update leaves no file behind)."""
    out, written = [], []
    for i, src in enumerate(ctx.recipe.retrieval.remove_sources):
        key = source_key(src, tok)
        label = f"retrieval.remove_sources[{i}]"
        record = ctx.workdir / REMOVALS_DIR / f"{key}.json"
        if not dist.broadcast_object(record.is_file()):
            written.append(record)
            stream = _tokenized(ctx, tok, src, ctx.workdir / REMOVALS_DIR / key, key, label)
            if ctx.env.is_main:
                files.write_json(record, {"digests": _digests(stream, np.arange(stream.num_docs)),
                                          "lengths": (np.diff(np.asarray(stream.doc_offsets)) - 1).tolist()})
                shutil.rmtree(ctx.workdir / REMOVALS_DIR / key)
            dist.barrier()
        data = files.read_json(record)
        out.append((f"{label} ({src.path})", data["digests"], data["lengths"]))
    return out, written


def _digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def _digests(stream: ts.TokenStream, docs: np.ndarray) -> list[str]:
    """Digest of each listed document's tokens, its EOD left out."""
    offsets = stream.doc_offsets
    return [_digest(stream.tokens[offsets[d]:offsets[d + 1] - 1]) for d in docs]


def match(parts: dict[str, ts.TokenStream], removals: list[Removal]) -> dict[str, np.ndarray]:
    """Per part, the sorted indexes of the documents a removal corpus names (every copy). Every
    removal document must be in the database: one that is not is an error naming it."""
    wanted: dict[str, tuple[str, int]] = {}
    lengths: set[int] = set()
    for label, digests, sizes in removals:
        lengths.update(sizes)
        for d, digest in enumerate(digests):
            wanted.setdefault(digest, (label, d))
    found: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name, stream in parts.items():
        # only documents of a length some removal has are hashed; blanked ones by their stored digest
        blanked = {int(d): h for d, h in stream.meta.get("blanked", {}).items()}
        sizes = np.diff(np.asarray(stream.doc_offsets, dtype=np.int64)) - 1
        candidates = [int(d) for d in np.flatnonzero(np.isin(sizes, list(lengths))) if int(d) not in blanked]
        pairs = list(zip(candidates, _digests(stream, np.asarray(candidates, dtype=np.int64)))) + list(blanked.items())
        hits = sorted(d for d, h in pairs if h in wanted)
        seen.update(h for _, h in pairs if h in wanted)
        found[name] = np.asarray(hits, dtype=np.int64)
    missing = [wanted[h] for h in wanted if h not in seen]
    if missing:
        label, d = missing[0]
        raise UserError(
            f"document {d} of {label} is not in the database: no train or extra document has exactly its text"
            + (f" ({len(missing)} such documents in all)" if len(missing) > 1 else "")
            + ". A removal corpus lists the exact documents to take out (as they were added); drop that "
            "document from it, or check the text against the database with `retro-run inspect`. Nothing was changed.")
    return found


def blank(ctx: StageContext, name: str, stream: ts.TokenStream, removed: np.ndarray, pad_id: int) -> None:
    """Overwrite the tokens of an extra corpus's removed documents (rank 0), keeping their digests
    so a later update still recognises them; a stream that blanked a document now wanted back
    must be tokenized again (the caller deletes it)."""
    meta_file = Path(stream.tokens.filename).parent / "meta.json"
    meta = files.read_json(meta_file)
    todo = [int(d) for d in removed if str(int(d)) not in meta["blanked"]]
    if not todo or not ctx.env.is_main:
        return
    offsets = stream.doc_offsets
    meta["blanked"].update({str(d): _digest(stream.tokens[offsets[d]:offsets[d + 1] - 1]) for d in todo})
    out = np.memmap(stream.tokens.filename, dtype=stream.tokens.dtype, mode="r+", shape=stream.tokens.shape)
    for d in todo:
        out[offsets[d]:offsets[d + 1] - 1] = pad_id
    out.flush()
    del out
    files.write_json(meta_file, meta)
    ctx.log(f"{name}: the tokens of {len(todo)} removed document(s) overwritten")


def unwanted_blanks(stream: ts.TokenStream, removed: np.ndarray) -> bool:
    """Whether the stream blanked a document that is no longer removed."""
    return bool(set(stream.meta.get("blanked", {})) - {str(int(d)) for d in removed})


def plan_parts(previous: chunk_db.ChunkDB | None, train: ts.TokenStream, extras: dict[str, ts.TokenStream],
               removed: dict[str, np.ndarray], m: int, keep_ids: bool) -> list[chunk_db.Part]:
    """The parts of the new chunk DB. keep_ids: every chunk id of `previous` keeps its place
    (neighbours kept from it refer to them): its parts stay in order, a corpus no longer listed
    becomes a retired part, and new corpora come after. Otherwise the recipe's order."""
    none = np.zeros(0, dtype=np.int64)
    parts = [chunk_db.Part("train", train.doc_offsets, removed.get("train", none))]
    left = dict(extras)
    if keep_ids and previous is not None:
        sizes = np.diff(previous.part_chunks)
        for name, size in zip(previous.parts[1:], sizes[1:].tolist()):
            if name in left:
                parts.append(chunk_db.Part(name, left.pop(name).doc_offsets, removed.get(name, none)))
            else:
                parts.append(chunk_db.Part(name if name.startswith(RETIRED) else RETIRED + name, None, reserved=size))
    parts += [chunk_db.Part(name, s.doc_offsets, removed.get(name, none)) for name, s in left.items()]
    if keep_ids and previous is not None:  # the kept ids must be where they were
        for old, new in zip(range(len(previous.parts)), parts):
            if new.chunks(m) != int(previous.part_chunks[old + 1] - previous.part_chunks[old]):
                raise RuntimeError(f"part {new.name} changed size; its chunk ids cannot be kept")
    return parts


def drop_unused(workdir: Path, parts: list[chunk_db.Part], removal_keys: set[str]) -> None:
    """Delete the streams of corpora no longer in the database, and removal corpora no longer listed."""
    live = {p.name.removeprefix("extra:") for p in parts if p.doc_offsets is not None}
    for folder, keep in ((workdir / EXTRA_DIR, live), (workdir / REMOVALS_DIR, removal_keys)):
        if folder.is_dir():
            for sub in folder.iterdir():
                if sub.stem not in keep:
                    shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
    for legacy in ("extra.bin", "extra.idx.npy", "meta.json"):  # one stream of every extra corpus, as once written
        if "extra" not in {p.name for p in parts}:
            (workdir / EXTRA_DIR / legacy).unlink(missing_ok=True)


def part_stream(workdir: Path, name: str) -> np.ndarray:
    """A part's tokens: the train split, an extra corpus, or none (retired)."""
    if name == "train":
        return ts.TokenStream(workdir / ts.CORPUS_DIR, "train").tokens
    if name == "extra":
        return ts.TokenStream(workdir / EXTRA_DIR, "extra").tokens
    if name.startswith("extra:"):
        return ts.TokenStream(workdir / EXTRA_DIR / name.removeprefix("extra:"), "docs").tokens
    return np.zeros(0, dtype=np.uint16)
