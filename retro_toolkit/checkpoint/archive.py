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
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from retro_toolkit.checkpoint.archive_members import checked
from retro_toolkit.checkpoint.archive_stream import members, open_archive
from retro_toolkit.checkpoint.archive_unpack import unpack
from retro_toolkit.errors import UserError

MAX_BYTES = 2**40  # unpacked bytes; a 48B-parameter model in bf16 is ~97 GB
MAX_MEMBERS = 100_000
# open_checked has no destination: the data filter is given a folder that does not exist,
# so it judges names and links alone.
_NOWHERE = os.path.join(os.sep, f"retro-toolkit-nowhere-{uuid.uuid4().hex}")


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


def names(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> list[str]:
    """Member names, in archive order (members are listed, not checked, beyond the limits)."""
    path = Path(path)
    with open_archive(path, max_bytes) as tar:
        return [m.name for m in members(path, tar, max_bytes, max_members)]


@contextlib.contextmanager
def open_checked(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES,
                 max_members: int = MAX_MEMBERS) -> Iterator[tarfile.TarFile]:
    """The archive open for reading members in memory, after the same checks as extract.

    One read of more than 64 MiB (less under a small max_bytes: see the module docstring)
    is refused, and a member found truncated or corrupt while read raises UserError.
    """
    path = Path(path)
    with open_archive(path, max_bytes) as tar:
        checked(path, tar, _NOWHERE, max_bytes, max_members)
        try:
            yield tar
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UserError(f"{path} is not a readable .nemo (tar) archive: {e}.") from None


def extract(path: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_BYTES,
            max_members: int = MAX_MEMBERS) -> Path:
    """Unpack a .nemo into dest after checking every member (see the module docstring).

    max_bytes bounds the unpacked size (declared sizes before writing, bytes while
    writing); max_members bounds the number of members. Raises UserError, leaving dest as
    it was, on any refusal or failure.
    """
    path, dest = Path(path), Path(dest)
    with open_archive(path, max_bytes) as tar:
        entries = checked(path, tar, str(dest), max_bytes, max_members)
        unpack(path, tar, entries, dest, max_bytes)
    return dest
