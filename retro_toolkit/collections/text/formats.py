"""Which reader a corpus path takes, and the readers for columnar and compressed files.

  FILE.jsonl, FILE.jsonl.gz, FILE.jsonl.zst   one JSON object per line, text under text_key
  FILE.txt                                    one document
  FILE.parquet                                one document per row of column text_key
  FILE.arrow                                  the same, Arrow IPC (file or stream format)
  a Hugging Face datasets folder              save_to_disk's folder (state.json + its .arrow files)
  PREFIX, PREFIX.idx or PREFIX.bin            a Megatron indexed dataset: token ids (megatron_indexed.py)
  a folder                                    every file of these kinds under it, sorted by path
Parquet and Arrow need pyarrow, .zst needs zstandard (pip install 'retro-toolkit[formats]').
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path
from typing import IO, Iterator, Optional

from retro_toolkit.errors import UserError

FILE_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".txt": "txt",
              ".parquet": "parquet", ".arrow": "arrow", ".idx": "megatron", ".bin": "megatron"}
SUPPORTED = ("a .jsonl (.jsonl.gz, .jsonl.zst), .txt, .parquet or .arrow file, a Hugging Face datasets folder "
             "(save_to_disk), a Megatron indexed dataset (PREFIX.bin + PREFIX.idx), or a folder of these")
EXTRA = "pip install 'retro-toolkit[formats]'"


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return next((s for s in sorted(FILE_KINDS, key=len, reverse=True) if name.endswith(s)), "")


def is_hf_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def kind_of(p: Path) -> Optional[str]:
    """jsonl, txt, parquet, arrow, hf_dataset, megatron or folder; None for anything else."""
    from retro_toolkit.collections.text.megatron_indexed import prefix_of

    if is_hf_dataset(p):
        return "hf_dataset"
    if p.is_dir():
        return "folder"
    kind = FILE_KINDS.get(_suffix(p))
    if kind is not None and (p.is_file() or kind == "megatron"):
        return kind
    return "megatron" if prefix_of(p) is not None else None


def folder_files(folder: Path) -> list[tuple[Path, str]]:
    """(path, kind) of every readable file under `folder`, sorted; a dataset's .idx/.bin pair once,
    and a Hugging Face datasets folder inside as one source."""
    out, seen = [], set()
    for p in sorted(folder.rglob("*")):
        if any(parent in seen for parent in p.parents):
            continue
        if is_hf_dataset(p):
            seen.add(p)
            out.append((p, "hf_dataset"))
        elif p.is_file() and FILE_KINDS.get(_suffix(p)) is not None:
            kind = FILE_KINDS[_suffix(p)]
            if kind == "megatron":
                if p.suffix != ".idx":
                    continue  # the pair is read through its .idx
                p = p.with_suffix("")
            out.append((p, kind))
    return out


def open_lines(path: Path) -> IO[bytes]:
    """A binary line stream of a .jsonl, .jsonl.gz or .jsonl.zst file."""
    suffix = _suffix(path)
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst needs zstandard: {EXTRA}.") from None
        return io.BufferedReader(_Zstd(path, zstandard))
    return open(path, "rb")


class _Zstd(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame; input that ends inside a frame raises
    EOFError (zstandard's own stream reader ends quietly there, losing the rest)."""

    def __init__(self, path: Path, zstandard) -> None:
        self.f, self.zstd = open(path, "rb"), zstandard
        self.d, self.pending, self.fresh = zstandard.ZstdDecompressor().decompressobj(), b"", True

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.pending:
            raw = self.f.read(1 << 20)
            if not raw:
                if not self.fresh:
                    raise EOFError("the input ends inside a zstd frame")
                return 0
            while raw:
                self.pending += self.d.decompress(raw)
                self.fresh = False
                raw = self.d.unused_data if self.d.eof else b""
                if self.d.eof:  # a frame ended: the next one (if any) needs a new decompressor
                    self.d, self.fresh = self.zstd.ZstdDecompressor().decompressobj(), True
        n = min(len(buf), len(self.pending))
        buf[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def is_damage(e: BaseException) -> bool:
    """An exception a damaged or truncated .gz / .zst raises while it is read."""
    return isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)) or type(e).__module__.startswith("zstandard")


def damaged(path: Path, e: BaseException) -> UserError:
    return UserError(f"{path}: cannot decompress ({str(e) or type(e).__name__}): the file is damaged or truncated. Copy "
                     "it again, or decompress it by hand to find the damage.")


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of a (possibly compressed) .jsonl; a damaged or truncated archive is a UserError."""
    try:
        with open_lines(path) as f:
            yield from f
    except Exception as e:
        if is_damage(e):
            raise damaged(path, e) from None
        raise


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"reading Parquet, Arrow and Hugging Face datasets needs pyarrow: {EXTRA}.") from None
    return pyarrow


def check_text_column(schema, path: Path, text_key: str, key: str) -> None:
    """The table must hold a string column `text_key`."""
    pa = _pyarrow()
    if text_key not in schema.names:
        raise UserError(f"{key}.path: {path} has no column '{text_key}' (its columns: "
                        f"{', '.join(schema.names[:12])}). Set {key}.text_key to the column that holds the text.")
    field = schema.field(text_key)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise UserError(f"{key}.path: {path} column '{text_key}' holds {field.type}, not strings. Set "
                        f"{key}.text_key to the column that holds the text.")


def text_batches(batches, schema, path: Path, text_key: str, key: str,
                 row: int = 0) -> Iterator[tuple[Optional[str], str]]:
    """(text or None, origin) of every row of record batches of a table (rows numbered from `row`)."""
    check_text_column(schema, path, text_key, key)
    for batch in batches:
        for text in batch.column(text_key).to_pylist():
            yield text, f"{path}:row{row}"
            row += 1


def _arrow_reader(path: Path):
    pa = _pyarrow()
    try:
        return pa.ipc.open_file(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid as e:
            raise UserError(f"{path}: not an Arrow IPC file or stream ({e}).") from None


def columnar_schema(path: Path, kind: str):
    """The schema of a .parquet or .arrow file (read from its footer or first message)."""
    pa = _pyarrow()
    if kind == "parquet":
        try:
            return pa.parquet.ParquetFile(str(path)).schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e}).") from None
    return _arrow_reader(path).schema


def arrow_texts(path: Path, text_key: str, key: str) -> Iterator[tuple[Optional[str], str]]:
    """(text or None, origin) of every row of an .arrow file, one record batch at a time."""
    reader = _arrow_reader(path)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
        if hasattr(reader, "num_record_batches") else reader
    yield from text_batches(batches, reader.schema, path, text_key, key)


def hf_dataset_files(folder: Path, key: str) -> list[Path]:
    """The .arrow files of a save_to_disk folder, in the order its state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{key}.path: {folder}/state.json does not list the dataset's files ({e}); is it a "
                        "datasets save_to_disk folder?") from None
    for f in files:
        if not f.is_file() or folder.resolve() not in f.resolve().parents:
            raise UserError(f"{key}.path: {folder}/state.json lists {f.name}, which the folder lacks.")
    return files
