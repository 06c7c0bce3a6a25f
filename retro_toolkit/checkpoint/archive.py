"""The .nemo container: a tar archive, written uncompressed, read plain or gzipped.

    pack("staging/", "export/model.nemo")     # every file under staging/, as ./<relative path>
    names("export/model.nemo")                # member names
    extract("export/model.nemo", "restored/") # checked first, then written

Extraction checks every member before it writes anything, and refuses the whole archive
if any member is an absolute path, climbs out with "..", is a link (symbolic or hard)
whose target lies outside the destination, or is a device or FIFO. A refused archive
leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

from retro_toolkit.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"


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


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    try:
        return tarfile.open(path, "r:gz" if gz else "r:")
    except tarfile.TarError as e:
        raise UserError(f"{path} is not a readable .nemo (tar) archive: {e}.") from None


def names(path: str | os.PathLike) -> list[str]:
    with _open(Path(path)) as tar:
        return tar.getnames()


def _inside(name: str) -> bool:
    """A relative archive path that stays inside the destination once normalised."""
    norm = posixpath.normpath(name)
    return not (name.startswith("/") or posixpath.isabs(norm) or norm == ".." or norm.startswith("../")
                or ":" in name.split("/")[0] or "\\" in name)


def _check(path: Path, member: tarfile.TarInfo) -> None:
    bad = None
    if not _inside(member.name):
        bad = "its path leaves the destination (absolute or '..')"
    elif member.isdev():
        bad = "it is a device or FIFO"
    elif member.issym():
        target = posixpath.join(posixpath.dirname(member.name), member.linkname)
        if member.linkname.startswith("/") or not _inside(target):
            bad = f"it is a symbolic link to {member.linkname!r}, outside the destination"
    elif member.islnk():
        if not _inside(member.linkname):
            bad = f"it is a hard link to {member.linkname!r}, outside the destination"
    elif not (member.isfile() or member.isdir()):
        bad = "it is neither a file nor a folder"
    if bad:
        raise UserError(f"{path}: refusing member {member.name!r}: {bad}. The archive was not extracted; "
                        "only unpack .nemo files from sources you trust.")


@contextlib.contextmanager
def open_checked(path: str | os.PathLike) -> Iterator[tarfile.TarFile]:
    """The archive open for reading members in memory, after the same checks as extract."""
    path = Path(path)
    with _open(path) as tar:
        for m in tar.getmembers():
            _check(path, m)
        yield tar


def extract(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a .nemo into dest after checking every member (see the module docstring)."""
    path, dest = Path(path), Path(dest)
    with _open(path) as tar:
        members = tar.getmembers()
        for m in members:
            _check(path, m)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for m in members:
            target = (root / posixpath.normpath(m.name)).resolve()
            if target != root and root not in target.parents:  # a link extracted earlier points out
                raise UserError(f"{path}: refusing member {m.name!r}: it would be written outside {dest}.")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.issym():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(m.linkname, target)
            elif m.islnk():
                shutil.copyfile(root / posixpath.normpath(m.linkname), target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    return dest
