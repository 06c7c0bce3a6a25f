"""Print a stage's own log (rank 0) as it grows, whatever executor runs the job.

Local, torchrun and Slurm jobs all write <workdir>/logs/<stage>.rank0.log, so following
that file gives the same clean console view everywhere (the work directory is on a
shared file system on a cluster).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path


class LogFollower:
    def __init__(self, path: Path, poll_s: float = 0.2) -> None:
        self.path, self.poll_s = path, poll_s
        self.offset = path.stat().st_size if path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LogFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        # Print whole lines only; a partial last line waits for the next poll.
        end = data.rfind(b"\n") + 1 if not self._stop.is_set() else len(data)
        if end:
            sys.stdout.write(data[:end].decode("utf-8", errors="replace"))
            sys.stdout.flush()
            self.offset += end

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()
