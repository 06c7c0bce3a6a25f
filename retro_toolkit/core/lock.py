"""One writer per work directory, for as long as any process of its run lives.

Two flock(2) locks in the work directory, both released by the kernel when their holder
dies however it dies, so a stale lock never blocks:
- `.retro-run.lock`: the runner (`retro-run`) holds it exclusively for the whole run;
- `.retro-run.workers.lock`: every stage worker (each rank, on this machine) holds it shared
  for its whole life (`worker_lock`).
A new runner needs the first, then checks that nobody holds the second: a worker whose
runner was killed (SIGKILL leaves its jobs running) still counts, and is named by pid.
Slurm jobs run elsewhere, where flock may not reach: their runner checks the queue instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from retro_toolkit.errors import UserError

RUNNER_LOCK = ".retro-run.lock"
WORKERS_LOCK = ".retro-run.workers.lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """The runner's lock; refuses while another runner, or a worker of any run, is alive."""
    path = workdir / RUNNER_LOCK
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
        _refuse_live_workers(workdir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _refuse_live_workers(workdir: Path) -> None:
    path = workdir / WORKERS_LOCK
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = holders(path)
        who = ", ".join(f"pid {p} ({_command(p)})" for p in pids) if pids else "a process this system does not name"
        raise UserError(
            f"a stage of an earlier run is still running in {workdir}: {who}. Its runner is gone but it "
            "still writes there; wait for it to end or stop it (kill PID), then run again, or use another "
            "workdir=..."
        ) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def worker_lock(workdir: Path) -> Iterator[None]:
    """Held (shared) by a stage worker for its whole life; see the module docstring."""
    fd = os.open(Path(workdir) / WORKERS_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def holders(path: Path) -> list[int]:
    """Pids holding a flock on `path`, from /proc/locks (Linux; empty where it cannot tell)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            pids.append(int(fields[4]))
    return sorted(set(pids))


def _command(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "command unknown"
    text = " ".join(a.decode(errors="replace") for a in args if a)
    return text if len(text) <= 100 else text[:97] + "..."
