"""GpuBridge: the production path from Redis into the GPU-resident queue.

Entries from a StreamConsumer are fed message by message into a running GpuQueue (no launch per
batch: the persistent kernel picks each message up); completed results are gathered per entry,
and an entry is published to the result stream and XACKed, atomically, once all its messages
are done.  Up to ``queue capacity`` messages are in flight; reading, enqueueing and publishing
overlap in one thread.
"""

from __future__ import annotations

import time

from ..errors import MessageFailed, PayloadError, QueueFull, check_instance, check_int, check_seconds
from .wire import encode_frame
from .worker import _Loop


class _Pending:
    __slots__ = ("entry", "results", "left")

    def __init__(self, entry):
        self.entry, self.results, self.left = entry, [None] * len(entry.payloads), len(entry.payloads)


class GpuBridge(_Loop):
    """Feeds ``consumer``'s entries into ``queue`` (a started GpuQueue) and publishes the results.

    publish_batch:    entries completed per publish + ack round trip (default 256); fewer when
                      nothing else is in flight or the oldest has waited ``max_wait_s`` (default 1 ms).
    reclaim_every_s:  seconds between XAUTOCLAIM scans for idle entries (default 1.0); an entry
                      reclaimed while it is still in this bridge (slower than ``claim_idle_ms``)
                      is not taken twice.
    """

    def __init__(
        self, consumer, queue, *, publish_batch: int = 256, max_wait_s: float = 1e-3, reclaim_every_s: float = 1.0
    ):
        from ..queue import GpuQueue

        super().__init__(consumer, reclaim_every_s)
        self.queue = check_instance("queue", queue, GpuQueue, "a GpuQueue")
        self.publish_batch = check_int("publish_batch", publish_batch, 1)
        self.max_wait_s = check_seconds("max_wait_s", max_wait_s)
        self._done_since = 0.0
        self._capacity = queue.config.capacity
        self._backlog: list = []  # (pending entry, index) not yet enqueued, oldest first
        self._inflight: dict = {}  # msg_id -> (pending entry, index)
        self._done: list = []  # pending entries with every result in
        self._held: set = set()  # ids of every entry in here, until published

    def busy(self) -> bool:
        return bool(self._backlog or self._inflight or self._done) or super().busy()

    def step(self, block_ms: int | None = None) -> int:
        """One round: read when there is room, enqueue, collect results, publish finished
        entries; returns the messages published in this step."""
        if self._unconfirmed is not None:
            return self._complete_again()
        if not self._draining and not self._backlog and len(self._inflight) < self._capacity // 2:
            wait = 0 if self._inflight or self._done else (self.consumer.block_ms if block_ms is None else block_ms)
            for entry in self._claim_or_read(wait):
                if entry.id in self._held:  # reclaimed from ourselves: it is already in here
                    continue
                self._held.add(entry.id)
                p = _Pending(entry)
                if p.left == 0:
                    self._mark_done(p)
                self._backlog += [(p, i) for i in range(p.left)]
        self._enqueue()
        self._collect()
        if self._done and (
            len(self._done) >= self.publish_batch
            or not self._inflight
            or time.monotonic() - self._done_since >= self.max_wait_s
        ):
            done, self._done = self._done, []
            self.stats.failed += sum(p.results.count(None) for p in done)
            self._held.difference_update(p.entry.id for p in done)
            self._publish([p.entry for p in done], [encode_frame(p.results) for p in done])
            return sum(len(p.results) for p in done)
        return 0

    def _enqueue(self) -> None:
        q, sent = self.queue, 0
        for p, i in self._backlog:
            payload = p.entry.payloads[i]
            try:
                self._inflight[q.enqueue(payload, timeout=0)] = (p, i)
            except QueueFull:
                break
            except PayloadError:  # larger than a slot: no result, reported as failed
                self._finish(p)
            sent += 1
        del self._backlog[:sent]

    def _collect(self) -> None:
        q = self.queue
        for msg_id in q.poll_completions():
            p, i = self._inflight.pop(msg_id)
            try:
                p.results[i] = q.try_dequeue_result(msg_id)
            except MessageFailed:  # the plugin failed it: no result, reported as failed
                p.results[i] = None
            self._finish(p)

    def _finish(self, p: _Pending) -> None:
        p.left -= 1
        if p.left == 0:
            self._mark_done(p)

    def _mark_done(self, p: _Pending) -> None:
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(p)
