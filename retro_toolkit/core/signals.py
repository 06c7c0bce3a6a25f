"""SIGTERM, SIGINT and SIGHUP stop a whole run, and training saves before it stops.

Two sides:
- the runner (`retro-run`), in `stop_run_on_signal()`: the jobs it starts live in their own
  sessions (runner/local_job.py starts them with setsid), so a signal to the runner reaches
  none of them. On the first signal the runner sends SIGTERM to every descendant (torchrun, its
  workers), waits for them to end (a training worker saves first), SIGKILLs what is left
  after `grace_s`, and raises `Interrupted`; the exit code is 128 + the signal number.
  The runner is a child subreaper, so a worker whose parent died is still its descendant.
- a worker, in `StopRequests`: while a training loop runs, those signals only set a flag;
  the loop finishes its iteration, all ranks agree, and it saves a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Exit code of a training stage that stopped at a checkpoint on its own time limit
# (EX_TEMPFAIL: try again; the rerun resumes).
EXIT_TIME_LIMIT = 75
_PR_SET_CHILD_SUBREAPER = 36


class Interrupted(BaseException):
    """The run was stopped by a signal. BaseException, as KeyboardInterrupt: code that catches
    Exception (NeMo-Run's waits among them) must not swallow it."""

    def __init__(self, signum: int, stopped: int = 0):
        self.signum, self.stopped = signum, stopped
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process, not to init (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_descendants(grace_s: float, first: int = signal.SIGTERM) -> int:
    """Stop every process below this one; returns how many there were.

    `first` goes to the jobs this process started (a worker, or torchrun, which passes it on
    to its workers), and they get grace_s to end, since a training worker saves first and may
    start helper processes to do it. Whatever is left after that (or sooner, once the jobs are
    gone) gets SIGTERM and then SIGKILL.
    """
    import psutil

    me = psutil.Process()
    jobs = [p for p in _live_descendants() if _parent(p) == me.pid]
    stopped = {p.pid for p in jobs}
    for p in jobs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(first)
    deadline = time.monotonic() + grace_s
    while jobs and time.monotonic() < deadline:
        _, jobs = psutil.wait_procs(jobs, timeout=min(0.2, deadline - time.monotonic()))
        _live_descendants()  # reaps
    for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0), (signal.SIGKILL, 1.0)):
        rest = _live_descendants()
        if not rest:
            break
        for p in rest:
            stopped.add(p.pid)
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        psutil.wait_procs(rest, timeout=wait_s)
    return len(stopped)


def _parent(p) -> int | None:
    import psutil

    try:
        return p.ppid()
    except psutil.Error:
        return None


def _live_descendants() -> list:
    """This process's descendants that have not exited; our own exited children are reaped."""
    import psutil

    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@contextlib.contextmanager
def stop_run_on_signal(grace_s: float = 60.0, log: Callable[[str], None] = print) -> Iterator[None]:
    """Inside: a stop signal ends every process of the run, then raises Interrupted. A second
    signal while the first is handled kills them at once."""
    become_subreaper()
    stopping: list[int] = []

    def handler(signum, _frame):
        if stopping:
            stop_descendants(0.0, signal.SIGKILL)
            return
        stopping.append(signum)
        log(f"\n{signal.Signals(signum).name}: stopping the run (training stages save a checkpoint first; "
            f"everything left after {grace_s:.0f} s is killed)")
        raise Interrupted(signum, stop_descendants(grace_s))

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopRequests:
    """A training loop's stop requests: a stop signal, or the stage's time limit. Every rank
    must call `agreed()` at the same iteration; it answers the same on all of them."""

    def __init__(self, exit_duration_minutes: Optional[float] = None, started: Optional[float] = None):
        """started: when the time limit's clock starts (default: when this process started)."""
        self.signum: Optional[int] = None
        self.deadline = None
        if exit_duration_minutes:
            if started is None:
                import psutil

                started = psutil.Process().create_time()
            self.deadline = started + 60 * exit_duration_minutes
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        def handler(signum, _frame):
            self.signum = self.signum or signum

        self._previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def local(self) -> int:
        """This rank's request: 0 none, 1 time limit, 2 + signum a signal."""
        if self.signum is not None:
            return 2 + self.signum
        return 1 if self.deadline is not None and time.time() >= self.deadline else 0

    def agreed(self) -> int:
        """The largest request of any rank (one all-reduce when there are several)."""
        code = self.local()
        try:
            import torch
            import torch.distributed as td
        except ImportError:
            return code
        if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
            device = "cuda" if td.get_backend() == "nccl" else "cpu"
            t = torch.tensor([code], dtype=torch.int64, device=device)
            td.all_reduce(t, op=td.ReduceOp.MAX)
            code = int(t.item())
        return code


def describe(code: int) -> tuple[str, int]:
    """(reason, exit code) of an agreed stop request."""
    if code == 1:
        return "its time limit (exit_duration_minutes)", EXIT_TIME_LIMIT
    signum = code - 2
    return signal.Signals(signum).name, 128 + signum
