"""GpuBridge: the production path from Redis into the GPU-resident queue.

Entries from a StreamConsumer are fed into a running GpuQueue in batches (no launch per batch: the
persistent kernel picks each message up): each entry's messages, already packed back to back with
their lengths (the frame form), go in with one ``enqueue_many`` per run of messages that fits
(one doorbell store), and results come back in order with ``take_ready`` (one call for everything
done, lengths and bytes back to back).  An entry is published to the result stream and XACKed,
atomically, once all its messages are done.  Up to ``queue capacity`` messages are in flight;
reading, enqueueing and publishing overlap in one thread.  The bridge must be its queue's only
producer and consumer.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..batch import FAILED
from ..errors import QueueFull, check_instance, check_int, check_seconds
from .wire import join_frame
from .worker import _Loop


class _Pending:
    """One entry in the bridge: its messages' byte offsets, the results' lengths (FAILED until a
    result arrives; for good where a message is larger than a slot or flagged) and bytes (in
    message order: results arrive in msg_id order and failed messages carry no bytes)."""

    __slots__ = ("entry", "offsets", "lens", "chunks", "left")

    def __init__(self, entry):
        self.entry = entry
        n = len(entry.lens)
        self.offsets = np.zeros(n + 1, np.int64)
        np.cumsum(entry.lens, out=self.offsets[1:])
        self.lens = np.full(n, FAILED, np.uint32)
        self.chunks: list = []
        self.left = n


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
        self._slot_bytes = queue.config.slot_bytes
        self._backlog: deque = deque()  # [pending entry, next index] not yet (all) enqueued, oldest first
        self._inflight: deque = deque()  # [first msg_id, count, pending entry, first index], in msg_id order
        self._inflight_count = 0  # messages enqueued and not yet taken
        self._done: list = []  # pending entries with every result in
        self._held: set = set()  # ids of every entry in here, until published

    def busy(self) -> bool:
        return bool(self._backlog or self._inflight or self._done) or super().busy()

    def step(self, block_ms: int | None = None) -> int:
        """One round: read when there is room, enqueue, collect results, publish finished
        entries; returns the messages published in this step."""
        if self._unconfirmed is not None:
            return self._complete_again()
        if not self._draining and not self._backlog and self._inflight_count < self._capacity // 2:
            wait = 0 if self._inflight or self._done else (self.consumer.block_ms if block_ms is None else block_ms)
            for entry in self._claim_or_read(wait):
                if entry.id in self._held:  # reclaimed from ourselves: it is already in here
                    continue
                self._held.add(entry.id)
                p = _Pending(entry)
                if p.left == 0:
                    self._mark_done(p)
                else:
                    self._backlog.append([p, 0])
        self._enqueue()
        self._collect()
        if self._done and (
            len(self._done) >= self.publish_batch
            or not self._inflight
            or time.monotonic() - self._done_since >= self.max_wait_s
        ):
            done, self._done = self._done, []
            self.stats.failed += sum(int((p.lens == FAILED).sum()) for p in done)
            self._held.difference_update(p.entry.id for p in done)
            self._publish([p.entry for p in done], [join_frame(p.lens, b"".join(p.chunks)) for p in done])
            return sum(len(p.lens) for p in done)
        return 0

    def _enqueue(self) -> None:
        """As many backlog messages as there are free slots, one enqueue_many per run of messages
        that fit a slot (a larger one gets no result: it is reported as failed)."""
        q, sb = self.queue, self._slot_bytes
        free = q.free_slots()
        backlog = self._backlog
        while backlog and free:
            item = backlog[0]
            p, i = item
            lens = p.entry.lens
            n = len(lens)
            run = lens[i : i + free]
            big = np.flatnonzero(run > sb)
            k = int(big[0]) if len(big) else len(run)
            if k:
                off = p.offsets
                try:
                    first = q.enqueue_many(p.entry.data[off[i] : off[i + k]], run[:k], timeout=0)
                except QueueFull:
                    return
                self._inflight.append([first, k, p, i])
                self._inflight_count += k
                free -= k
                i += k
            if i < n and lens[i] > sb:  # larger than a slot: no result, reported as failed
                i += 1
                self._finish(p, 1)
            if i == n:
                backlog.popleft()
            else:
                item[1] = i

    def _collect(self) -> None:
        """Everything done, in msg_id order, in one take; spread over the entries in flight."""
        first, data, lens = self.queue.take_ready(packed=True, errors="mark")
        k = len(lens)
        if not k:
            return
        data = memoryview(data)
        sizes = np.where(lens == FAILED, 0, lens).astype(np.int64)
        ends = np.cumsum(sizes)
        inflight = self._inflight
        i = b = 0
        while i < k:
            run = inflight[0]
            f, c, p, start = run
            assert f == first + i, "the bridge's queue has another consumer or producer"
            take = min(c, k - i)
            e = int(ends[i + take - 1])
            p.lens[start : start + take] = lens[i : i + take]
            p.chunks.append(data[b:e])
            if take == c:
                inflight.popleft()
            else:
                run[0], run[1], run[3] = f + take, c - take, start + take
            self._inflight_count -= take
            self._finish(p, take)
            i, b = i + take, e

    def _finish(self, p: _Pending, count: int) -> None:
        p.left -= count
        if p.left == 0:
            self._mark_done(p)

    def _mark_done(self, p: _Pending) -> None:
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(p)
