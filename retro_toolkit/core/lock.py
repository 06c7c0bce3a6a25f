"""One runner per work directory: a second `retro-run` on the same one stops at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from retro_toolkit.errors import UserError


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    path = workdir / ".retro-run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"another retro-run (pid {holder}) is running in {workdir}; wait for it to finish "
                "or use another workdir=..."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
