"""Opening a .nemo (tar) archive, plain or gzipped, and reading its member headers within
budgets: no single read past a cap, no member past `max_members`, no sum of declared file
sizes past `max_bytes` (the rules are in archive.py's docstring)."""

from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from retro_toolkit.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
MAX_READ = 64 * 2**20  # bytes in one read from the archive stream
_MIN_READ = 2**20  # the read cap under a small max_bytes
_TRUST = "only unpack .nemo files from sources you trust"


class _Capped:
    """The archive stream, refusing any one read above `cap` bytes.

    A small gzipped file can inflate to any size, and tarfile reads a GNU long name or a pax
    header in one read, as do readers taking a whole member with .read().
    """

    def __init__(self, stream: BinaryIO, path: Path, cap: int):
        self._stream, self._path, self._cap = stream, path, cap

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._cap:
            raise UserError(f"{self._path}: refusing the archive: a member header or member asks for more than "
                            f"{self._cap:,} bytes in one read; it may be a decompression bomb. {_TRUST.capitalize()}.")
        return self._stream.read(n)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self._stream.seek(pos, whence)

    def tell(self) -> int:
        return self._stream.tell()


@contextlib.contextmanager
def _unreadable_as_user_error(path: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path} is not a readable .nemo (tar) archive: {e}.") from None


@contextlib.contextmanager
def open_archive(path: Path, max_bytes: int) -> Iterator[tarfile.TarFile]:
    """The archive open for reading through a capped stream; UserError if it is missing or unreadable."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file.")
    with contextlib.ExitStack() as stack:
        with _unreadable_as_user_error(path):
            raw = stack.enter_context(open(path, "rb"))
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            stream: BinaryIO = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")) if gzipped else raw
            capped = _Capped(stream, path, min(MAX_READ, max(max_bytes, _MIN_READ)))
            tar = stack.enter_context(tarfile.open(fileobj=capped, mode="r:"))
        yield tar


def refuse(path: Path, member: tarfile.TarInfo, why: str) -> UserError:
    """The error refusing the whole archive because of `member`."""
    return UserError(f"{path}: refusing member {member.name!r}: {why}. The archive was refused whole; {_TRUST}.")


def members(path: Path, tar: tarfile.TarFile, max_bytes: int, max_members: int) -> Iterator[tarfile.TarInfo]:
    """Member headers one at a time, within the member count and the declared-size budget.

    Counted: members whose data follows their header (files, and unknown types, which
    tarfile treats as files). This runs before tarfile reads past a member, so a bomb is
    refused before it is decompressed.
    """
    declared = 0
    with _unreadable_as_user_error(path):
        for i, m in enumerate(tar):
            if i >= max_members:
                raise refuse(path, m, f"the archive has more than {max_members:,} members (max_members)")
            if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES:
                declared += m.size
                if declared > max_bytes:
                    raise refuse(path, m, f"its declared size of {m.size:,} bytes brings the archive past the "
                                          f"budget of {max_bytes:,} bytes (max_bytes)")
            yield m
