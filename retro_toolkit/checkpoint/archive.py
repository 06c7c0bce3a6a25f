"""The .nemo container: a tar archive, written uncompressed, read plain or gzipped.

    pack("staging/", "export/model.nemo")     # every file under staging/, as ./<relative path>
    names("export/model.nemo")                # member names
    extract("export/model.nemo", "restored/") # checked first, then written

An archive is treated as hostile until checked. `extract` and `open_checked` read every
member header before anything is written or handed out, and refuse the whole archive if
any member:

- is not a regular file or a folder. Links (symbolic or hard), devices, FIFOs and unknown
  types are refused: `pack` writes only files, so no package needs a link, and a link is
  how an archive escapes its destination (a chain such as `a -> .`, `b -> a/..` passes
  the standard library's "data" filter, which judges each link against the file system
  as it is before the others exist);
- has an absolute name (a leading "/", a drive letter or a backslash), a name with a
  ".." part, or a NUL byte in its name; `tarfile.data_filter` is applied to every member
  as well, and these rules add what it allows (it strips a leading "/" and accepts
  "a/../b");
- shares its path with another member (folders excepted), or would replace the
  destination itself;
- is the member past `max_members` (default 100,000), or brings the sum of declared file
  sizes past `max_bytes` (default 1 TiB). Headers are read one at a time, so a bomb is
  refused before the stream is decompressed past it.

Besides, no single read from the (decompressed) stream may exceed 64 MiB, or `max_bytes`
when smaller (never less than 1 MiB): tarfile reads a long name or pax header, and a
reader a whole member, in one read.

While writing, every folder on the way to a member must be a real folder (a link already in
the destination would redirect the write), each file is created new (never through or over
something already there), and the bytes written are counted against `max_bytes`.

On any refusal or error, the destination is left as it was: a folder `extract` created is
removed, and in a folder that existed before, everything `extract` wrote is removed.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from retro_toolkit.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
MAX_BYTES = 2**40  # unpacked bytes; a 48B-parameter model in bf16 is ~97 GB
MAX_MEMBERS = 100_000
MAX_READ = 64 * 2**20  # bytes in one read from the archive stream
_CHUNK = 2**20
_TRUST = "only unpack .nemo files from sources you trust"
# open_checked has no destination: the data filter is given a folder that does not exist,
# so it judges names and links alone.
_NOWHERE = os.path.join(os.sep, f"retro-toolkit-nowhere-{uuid.uuid4().hex}")

Parts = tuple[str, ...]


def pack(src_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write every file under src_dir into an uncompressed tar at `out` (atomically)."""
    src, out = Path(src_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname="./" + path.relative_to(src).as_posix(), recursive=False)
    os.replace(tmp, out)
    return out


# --- reading -------------------------------------------------------------------------------

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
def _open(path: Path, max_bytes: int) -> Iterator[tarfile.TarFile]:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file.")
    with contextlib.ExitStack() as stack:
        with _unreadable_as_user_error(path):
            raw = stack.enter_context(open(path, "rb"))
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            stream: BinaryIO = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")) if gzipped else raw
            capped = _Capped(stream, path, min(MAX_READ, max(max_bytes, _CHUNK)))
            tar = stack.enter_context(tarfile.open(fileobj=capped, mode="r:"))
        yield tar


def _refuse(path: Path, member: tarfile.TarInfo, why: str) -> UserError:
    return UserError(f"{path}: refusing member {member.name!r}: {why}. The archive was refused whole; {_TRUST}.")


def _members(path: Path, tar: tarfile.TarFile, max_bytes: int, max_members: int) -> Iterator[tarfile.TarInfo]:
    """Member headers one at a time, within the member count and the declared-size budget.

    Counted: members whose data follows their header (files, and unknown types, which
    tarfile treats as files). This runs before tarfile reads past a member, so a bomb is
    refused before it is decompressed.
    """
    declared = 0
    with _unreadable_as_user_error(path):
        for i, m in enumerate(tar):
            if i >= max_members:
                raise _refuse(path, m, f"the archive has more than {max_members:,} members (max_members)")
            if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES:
                declared += m.size
                if declared > max_bytes:
                    raise _refuse(path, m, f"its declared size of {m.size:,} bytes brings the archive past the "
                                           f"budget of {max_bytes:,} bytes (max_bytes)")
            yield m


def names(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> list[str]:
    """Member names, in archive order (members are listed, not checked, beyond the limits)."""
    path = Path(path)
    with _open(path, max_bytes) as tar:
        return [m.name for m in _members(path, tar, max_bytes, max_members)]


# --- checking ------------------------------------------------------------------------------

@dataclass
class _Entry:
    member: tarfile.TarInfo  # as the data filter returned it (modes made safe)
    parts: Parts  # its path under the destination, "." parts dropped


def _parts(name: str) -> Parts:
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _filter_reason(member: tarfile.TarInfo, e: tarfile.FilterError) -> str:
    if isinstance(e, (tarfile.AbsolutePathError, tarfile.OutsideDestinationError)):
        return "its path leaves the destination (absolute or '..')"
    return str(e)


def _check_member(path: Path, member: tarfile.TarInfo, dest: str) -> _Entry:
    name = member.name
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise _refuse(path, member, f"it is a {kind} link (to {member.linkname!r}); a package holds only files "
                                    "and folders")
    if not (member.isreg() or member.isdir()):
        raise _refuse(path, member, "it is a device or FIFO" if member.isdev() else "it is neither a file nor a folder")
    # A pax header can carry one; the filter's realpath would raise ValueError on it.
    if "\0" in name:
        raise _refuse(path, member, "its name contains a NUL byte")
    # The data filter strips a leading "/" and unpacks under dest; no package has one, so refuse.
    # Backslashes and drive letters are plain characters here but paths elsewhere.
    if name.startswith("/") or "\\" in name or ":" in name.split("/")[0]:
        raise _refuse(path, member, "its path leaves the destination (absolute or '..')")
    try:
        filtered = tarfile.data_filter(member, dest)
    except tarfile.FilterError as e:
        raise _refuse(path, member, _filter_reason(member, e)) from None
    parts = _parts(name)
    if ".." in parts:  # the filter allows "a/../b"
        raise _refuse(path, member, "its path uses '..', which a package never needs")
    if not parts and not member.isdir():
        raise _refuse(path, member, "it would replace the destination folder itself")
    return _Entry(filtered, parts)


def _checked(path: Path, tar: tarfile.TarFile, dest: str, max_bytes: int, max_members: int) -> list[_Entry]:
    by_path: dict[Parts, _Entry] = {}
    for m in _members(path, tar, max_bytes, max_members):
        e = _check_member(path, m, dest)
        first = by_path.setdefault(e.parts, e)
        if first is not e and not (first.member.isdir() and e.member.isdir()):
            raise _refuse(path, m, f"member {first.member.name!r} has the same path")
    return list(by_path.values())


@contextlib.contextmanager
def open_checked(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES,
                 max_members: int = MAX_MEMBERS) -> Iterator[tarfile.TarFile]:
    """The archive open for reading members in memory, after the same checks as extract.

    One read of more than 64 MiB (less under a small max_bytes: see the module docstring)
    is refused, and a member found truncated or corrupt while read raises UserError.
    """
    path = Path(path)
    with _open(path, max_bytes) as tar:
        _checked(path, tar, _NOWHERE, max_bytes, max_members)
        try:
            yield tar
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UserError(f"{path} is not a readable .nemo (tar) archive: {e}.") from None


# --- writing -------------------------------------------------------------------------------

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
    # tarfile hands out exactly a member's declared size, which _members already counted, so
    # this cannot fire on a well-formed stream; it is the backstop should the two ever differ.
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


def _write(tar: tarfile.TarFile, e: _Entry, root: Path, budget: _Budget, written: list[Path]) -> None:
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


def _write_all(path: Path, tar: tarfile.TarFile, entries: list[_Entry], dest: Path, root: Path,
               max_bytes: int, written: list[Path]) -> None:
    budget = _Budget(max_bytes)
    for e in entries:
        try:
            _write(tar, e, root, budget, written)
        except _OverBudget:
            raise _refuse(path, e.member, f"writing it went past the budget of {max_bytes:,} bytes (max_bytes)") \
                from None
        except _Blocked as why:
            raise _refuse(path, e.member, f"it would be written through or over something already in {dest}: "
                                          f"{why}") from None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise UserError(f"{path}: could not unpack member {e.member.name!r} into {dest}: {err}. {dest} was "
                            "left as it was; unpack into a new or empty folder, from an intact archive.") from None


def extract(path: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_BYTES,
            max_members: int = MAX_MEMBERS) -> Path:
    """Unpack a .nemo into dest after checking every member (see the module docstring).

    max_bytes bounds the unpacked size (declared sizes before writing, bytes while
    writing); max_members bounds the number of members. Raises UserError, leaving dest as
    it was, on any refusal or failure.
    """
    path, dest = Path(path), Path(dest)
    with _open(path, max_bytes) as tar:
        entries = _checked(path, tar, str(dest), max_bytes, max_members)
        made = _make_dest(path, dest)
        written: list[Path] = []
        try:
            _write_all(path, tar, entries, dest, Path(os.path.realpath(dest)), max_bytes, written)
        except BaseException:
            _undo(made, written)
            raise
    return dest
