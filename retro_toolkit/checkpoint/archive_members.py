"""The rules each member of a .nemo archive must pass before anything is written or handed
out: files and folders only, names that stay under the destination, no two members at one
path (the full list is in archive.py's docstring)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from retro_toolkit.checkpoint.archive_stream import members, refuse

Parts = tuple[str, ...]


@dataclass
class Entry:
    """A member that passed the checks."""

    member: tarfile.TarInfo  # as the data filter returned it (modes made safe)
    parts: Parts  # its path under the destination, "." parts dropped


def _parts(name: str) -> Parts:
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _filter_reason(member: tarfile.TarInfo, e: tarfile.FilterError) -> str:
    if isinstance(e, (tarfile.AbsolutePathError, tarfile.OutsideDestinationError)):
        return "its path leaves the destination (absolute or '..')"
    return str(e)


def _check_member(path: Path, member: tarfile.TarInfo, dest: str) -> Entry:
    name = member.name
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise refuse(path, member, f"it is a {kind} link (to {member.linkname!r}); a package holds only files "
                                   "and folders")
    if not (member.isreg() or member.isdir()):
        raise refuse(path, member, "it is a device or FIFO" if member.isdev() else "it is neither a file nor a folder")
    # A pax header can carry one; the filter's realpath would raise ValueError on it.
    if "\0" in name:
        raise refuse(path, member, "its name contains a NUL byte")
    # The data filter strips a leading "/" and unpacks under dest; no package has one, so refuse.
    # Backslashes and drive letters are plain characters here but paths elsewhere.
    if name.startswith("/") or "\\" in name or ":" in name.split("/")[0]:
        raise refuse(path, member, "its path leaves the destination (absolute or '..')")
    try:
        filtered = tarfile.data_filter(member, dest)
    except tarfile.FilterError as e:
        raise refuse(path, member, _filter_reason(member, e)) from None
    parts = _parts(name)
    if ".." in parts:  # the filter allows "a/../b"
        raise refuse(path, member, "its path uses '..', which a package never needs")
    if not parts and not member.isdir():
        raise refuse(path, member, "it would replace the destination folder itself")
    return Entry(filtered, parts)


def checked(path: Path, tar: tarfile.TarFile, dest: str, max_bytes: int, max_members: int) -> list[Entry]:
    """Every member, checked for unpacking under `dest`, one entry per path (folders may repeat)."""
    by_path: dict[Parts, Entry] = {}
    for m in members(path, tar, max_bytes, max_members):
        e = _check_member(path, m, dest)
        first = by_path.setdefault(e.parts, e)
        if first is not e and not (first.member.isdir() and e.member.isdir()):
            raise refuse(path, m, f"member {first.member.name!r} has the same path")
    return list(by_path.values())
