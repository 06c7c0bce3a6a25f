"""Requests batched into the cached generator, on one worker thread that owns the model.

A request becomes one `Job` per choice. The worker takes the oldest job, then waits up to
`max_wait_s` for more jobs that can share its batch (the same sampling settings and the same
kind of neighbours) until it has `max_batch`; jobs that cannot share wait for the next batch,
in order. Rows keep their own limits: a row that reaches its max_tokens or one of its stop
strings, or whose client went away, ends while the others go on, and the batch ends with its
last row. Tokens reach each job's event queue on its asyncio loop as they are chosen.

Sampling draws from one generator per batch (seeded by the batch's seed), so a sampled
(temperature > 0) answer depends on which requests shared its batch; a greedy one does not.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from retro_toolkit.collections.generate.generator import generate_ids
from retro_toolkit.collections.generate.neighbors import FixedNeighbors, LiveRetrieval
from retro_toolkit.collections.generate.sampling import SamplingParams


@dataclass
class Job:
    index: int  # the choice this job answers, in its request
    ids: list[int]
    params: SamplingParams
    neighbours: Optional[np.ndarray]  # [k, r] fixed neighbours of every chunk, or None: live retrieval
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    retrieved: list[list[int]] = field(default_factory=list)  # per completed chunk, its neighbour chunk ids

    def key(self) -> tuple:
        p = self.params
        return p.temperature, p.top_k, p.top_p, p.seed, self.neighbours is None, self.ignore_eos

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *event))


class Engine:
    def __init__(self, session, max_batch: int = 8, max_wait_s: float = 0.005) -> None:
        self.session, self.max_batch, self.max_wait_s = session, max_batch, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._held: deque = deque()  # taken from the queue but not batchable with the last batch
        self.batches_run = self.largest_batch = self.rows_cancelled = 0  # what /health reports
        self.lock = threading.Lock()  # held while a batch runs: other users of the session wait
        self._thread = threading.Thread(target=self._serve, name="retro-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _next(self, timeout: Optional[float]) -> Optional[Job]:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _serve(self) -> None:
        while True:
            first = self._next(None)
            batch, skipped = [first], []
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                job = self._next(max(0.0, deadline - time.monotonic()))
                if job is None:
                    break
                (batch if job.key() == first.key() else skipped).append(job)
            self._held.extendleft(reversed(skipped))
            live = [j for j in batch if not j.cancelled.is_set()]
            self.rows_cancelled += len(batch) - len(live)
            batch = live
            if batch:
                with self.lock:
                    self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        s = self.session
        tok = s.tokenizer
        if batch[0].neighbours is None:
            source = LiveRetrieval(s.current_retriever(), s.model.config.num_neighbors)
        else:
            source = FixedNeighbors.from_tensor(np.stack([j.neighbours for j in batch]))
        params = SamplingParams(max(j.params.max_new_tokens for j in batch), batch[0].params.temperature,
                                batch[0].params.top_k, batch[0].params.top_p, [], batch[0].params.seed)
        ended: dict[int, str] = {}

        def on_token(row: int, token: int) -> None:
            job = batch[row]
            job.tokens.append(token)
            job.send("token", token)

        def cancelled(row: int) -> bool:
            job = batch[row]
            if job.cancelled.is_set():
                ended.setdefault(row, "cancelled")
            elif len(job.tokens) >= job.params.max_new_tokens:
                ended.setdefault(row, "length")
            elif job.params.stop and any(x in tok.decode(job.tokens) for x in job.params.stop):
                ended.setdefault(row, "stop")
            return row in ended

        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            outs = generate_ids(s.model, [j.ids for j in batch], params, source,
                                eos_id=None if batch[0].ignore_eos else tok.eod_id,
                                pad_id=tok.pad_id, on_token=on_token, cancelled=cancelled)
        except Exception as e:  # a failed batch fails its requests, never the worker
            for job in batch:
                job.send("error", f"{type(e).__name__}: {e}")
            return
        finally:
            self.rows_cancelled += sum(1 for reason in ended.values() if reason == "cancelled")
        if isinstance(source, LiveRetrieval):
            for chunk, ids in source.log:
                for row, job in enumerate(batch):
                    if (chunk + 1) * s.model.config.chunk_length <= len(job.ids) + len(job.tokens):
                        job.retrieved.append([int(x) for x in ids[row]])
        for row, (job, out) in enumerate(zip(batch, outs)):
            reason = ended.get(row, out.finish_reason)
            job.send("done", "stop" if reason in ("eos", "stop") else reason)
