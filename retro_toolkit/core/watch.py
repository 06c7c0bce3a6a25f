"""A job's heartbeat, and a barrier that waits as long as every rank is alive.

Ranks wait at `barrier()` for hours at scale while rank 0 trains a faiss index or writes a
database, so no fixed timeout fits that wait. What ends it instead is silence: every rank
bumps a counter in the job's store every few seconds, rank 0 reads them all, and when a
rank has not been heard from for the collective timeout (a node died or fell off the
network), rank 0 posts why and every waiting rank raises it. A rank that cannot reach the
store at all (its link is down) raises when the store's own timeout runs out. Either way
the wait is bounded by the collective timeout, not by the job's time limit.

The store is the one torchrun gives the workers (MASTER_ADDR:MASTER_PORT), reached through
a connection and a key prefix of this module's own.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Any, Optional

PREFIX = "retro_watch/"


class PeerLost(RuntimeError):
    """A rank of the job went silent, or the job's store went out of reach."""


class Watch:
    def __init__(self, rank: int, world_size: int, node: str, timeout_s: float,
                 period_s: Optional[float] = None) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.period_s = period_s if period_s is not None else min(5.0, timeout_s / 6)
        self.failure: Optional[str] = None
        # Only the watch thread talks to the store: an operation can block for as long as
        # TCP retransmits (a quarter of an hour) once the link is gone, and the main thread
        # must still be able to give up after the timeout.
        self._store = self._connect()
        self._store.set(f"node/{rank}", node)
        self._store.add(f"alive/{rank}", 1)
        self._last_ok = time.monotonic()
        self._arrivals: list[str] = []
        self._waiting: Optional[str] = None
        self._reached = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._joined = False
        self._barriers = 0
        self._thread = threading.Thread(target=self._run, name="retro-watch", daemon=True)
        self._thread.start()
        self._sync("joined", deadline=time.monotonic() + timeout_s)  # every counter exists first
        self._joined = True

    def _connect(self) -> Any:
        import torch.distributed as td

        raw = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)
        return td.PrefixStore(PREFIX, raw)

    # ---------------------------------------------------------------- the watch thread
    def _run(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        next_beat, pause = 0.0, 0.005
        while not self._stop.is_set():
            try:
                while self._arrivals:
                    self._store.add(self._arrivals[0], 1)
                    self._arrivals.pop(0)
                if time.monotonic() >= next_beat:
                    self._beat(seen)
                    next_beat = time.monotonic() + self.period_s
                if self._waiting is not None:
                    if int(self._store.add(self._waiting, 0)) >= self.world_size:
                        self._waiting = None
                        self._reached.set()
                    else:
                        pause = min(pause * 2, 0.5)  # 2,000 waiting ranks: 4,000 store reads a second
                self._last_ok = time.monotonic()
            except PeerLost as e:
                self.failure = str(e)
            except Exception as e:  # noqa: BLE001 (the store's own errors: timeout, connection reset)
                self.failure = self._lost_store(e)
            if self.failure:
                self._reached.set()
                return
            if self._waiting is None:
                pause = 0.005
            self._wake.wait(pause if self._waiting is not None else max(0.0, next_beat - time.monotonic()))
            self._wake.clear()

    def _beat(self, seen: dict[int, tuple[int, float]]) -> None:
        self._store.add(f"alive/{self.rank}", 1)
        if not self._joined:
            return
        if self.rank == 0:
            try:
                self._check(seen, range(self.world_size))
            except PeerLost as e:
                self._store.set("failed", str(e))
                raise
        elif self._store.check(["failed"]):
            raise PeerLost(self._store.get("failed").decode())
        else:
            self._check(seen, [0])

    def _check(self, seen: dict[int, tuple[int, float]], ranks) -> None:
        ranks = list(ranks)
        now = time.monotonic()
        beats = self._store.multi_get([f"alive/{r}" for r in ranks])
        for r, beat in zip(ranks, beats):
            count = int(beat)
            if r not in seen or seen[r][0] != count:
                seen[r] = (count, now)
            elif now - seen[r][1] > self.timeout_s and not self._store.check([f"bye/{r}"]):
                node = self._store.get(f"node/{r}").decode()
                raise PeerLost(f"rank {r} on node {node} has not been heard from for {now - seen[r][1]:.0f} s "
                               f"(the collective timeout is {self.timeout_s:.0f} s): its node died or lost "
                               "its network")

    def _lost_store(self, e: Exception) -> str:
        why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        return f"rank {self.rank} lost the job's store at {self._where()}: {why}"

    def _where(self) -> str:
        return f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"

    # ---------------------------------------------------------------- the main thread
    def _sync(self, key: str, deadline: Optional[float] = None) -> None:
        """Count this rank in at `key` and wait until every rank is."""
        if self.failure:
            raise PeerLost(self.failure)
        self._reached.clear()
        self._waiting = key
        self._arrivals.append(key)
        self._wake.set()
        while not self._reached.wait(0.5):
            now = time.monotonic()
            if now - self._last_ok > self.timeout_s:
                self.failure = (f"rank {self.rank} has had no answer from the job's store at {self._where()} for "
                                f"{now - self._last_ok:.0f} s (the collective timeout is {self.timeout_s:.0f} s): "
                                "this node lost its network, or the job's first node died")
                raise PeerLost(self.failure)
            if deadline is not None and now > deadline:
                raise PeerLost(f"not every rank reached the job's store within {self.timeout_s:.0f} s")
        if self.failure:
            raise PeerLost(self.failure)

    def barrier(self) -> None:
        self._barriers += 1
        self._sync(f"barrier/{self._barriers}")

    def store_lost(self) -> bool:
        """Whether the job's store is out of reach: it has not answered for the timeout (this
        waits out the rest of it), or an operation on it failed. False once it answers."""
        while True:
            if self.failure is not None or not self._thread.is_alive():
                return self.failure is not None and "the job's store" in self.failure
            silent = time.monotonic() - self._last_ok
            if silent < 2 * self.period_s:
                return False
            if silent >= self.timeout_s:
                return True
            time.sleep(0.2)

    def close(self) -> None:
        """This rank is done: it stops beating, and rank 0 stops expecting it to."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.period_s + 5)
        if not self._thread.is_alive():
            try:
                self._store.set(f"bye/{self.rank}", "1")
            except Exception:  # noqa: BLE001 (the store may be gone with the job)
                pass
