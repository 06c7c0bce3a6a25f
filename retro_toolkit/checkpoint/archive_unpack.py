"""Writing checked .nemo members under a destination folder.

Every folder on the way must be a real folder, each file is created new, the bytes
written count against `max_bytes`, and on any failure what was written is removed (or
the destination itself, where the unpacking created it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from retro_toolkit.checkpoint.archive_members import Entry, Parts
from retro_toolkit.checkpoint.archive_stream import refuse
from retro_toolkit.errors import UserError

_CHUNK = 2**20


class _OverBudget(Exception):
    pass


class _Budget:
    """Bytes written so far against max_bytes, checked before each write."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise _OverBudget(self.limit)
        self.used += n


def _copy(src: BinaryIO, out: BinaryIO, budget: _Budget) -> None:
    # tarfile hands out exactly a member's declared size, which archive_stream.members already
    # counted, so this cannot fire on a well-formed stream; it is the backstop should the two ever differ.
    while chunk := src.read(_CHUNK):
        budget.take(len(chunk))
        out.write(chunk)


class _Blocked(Exception):
    pass


def _mkdir(folder: Path, written: list[Path]) -> None:
    try:
        os.mkdir(folder)
    except FileExistsError:
        # lstat, not stat: a link already there, even to a folder inside, would redirect writes.
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise _Blocked(f"{folder} is already there and is not a folder") from None
        return
    written.append(folder)


def _folder(root: Path, parts: Parts, written: list[Path]) -> Path:
    folder = root
    for part in parts:
        folder = folder / part
        _mkdir(folder, written)
    return folder


def _new_file(target: Path, mode: int | None, written: list[Path]) -> BinaryIO:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    written.append(target)
    os.fchmod(fd, 0o644 if mode is None else mode)
    return open(fd, "wb")


def _write(tar: tarfile.TarFile, e: Entry, root: Path, budget: _Budget, written: list[Path]) -> None:
    if not e.parts:
        return  # "./": the destination itself
    target = _folder(root, e.parts[:-1], written) / e.parts[-1]
    if e.member.isdir():
        _mkdir(target, written)
        return
    with tar.extractfile(e.member) as src, _new_file(target, e.member.mode, written) as out:
        _copy(src, out, budget)


def _make_dest(path: Path, dest: Path) -> Path | None:
    """Create dest; the top-most folder this created (to remove on failure), or None."""
    top = None
    for folder in (dest, *dest.parents):
        if os.path.lexists(folder):
            break
        top = folder
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot unpack into {dest}: {e}.") from None
    return top


def _undo(made: Path | None, written: list[Path]) -> None:
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for p in reversed(written):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(p).st_mode):
                os.rmdir(p)
            else:
                os.unlink(p)


def _write_all(path: Path, tar: tarfile.TarFile, entries: list[Entry], dest: Path, root: Path,
               max_bytes: int, written: list[Path]) -> None:
    budget = _Budget(max_bytes)
    for e in entries:
        try:
            _write(tar, e, root, budget, written)
        except _OverBudget:
            raise refuse(path, e.member, f"writing it went past the budget of {max_bytes:,} bytes (max_bytes)") \
                from None
        except _Blocked as why:
            raise refuse(path, e.member, f"it would be written through or over something already in {dest}: "
                                         f"{why}") from None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise UserError(f"{path}: could not unpack member {e.member.name!r} into {dest}: {err}. {dest} was "
                            "left as it was; unpack into a new or empty folder, from an intact archive.") from None


def unpack(path: Path, tar: tarfile.TarFile, entries: list[Entry], dest: Path, max_bytes: int) -> None:
    """Write `entries` of the open archive under dest (created if need be); on any failure,
    leave dest as it was and raise."""
    made = _make_dest(path, dest)
    written: list[Path] = []
    try:
        _write_all(path, tar, entries, dest, Path(os.path.realpath(dest)), max_bytes, written)
    except BaseException:
        _undo(made, written)
        raise
