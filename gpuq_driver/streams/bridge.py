"""GpuBridge: the production path from Redis into the GPU-resident queue.

Entries from a StreamConsumer are fed into a running GpuQueue (no launch per batch: the persistent
kernel picks each message up) a whole read at a time: the messages of every entry one XREADGROUP
returned (already packed back to back with their lengths, the frame form) make one batch, which
goes in with one ``enqueue_many`` (more where the ring has less room: one doorbell store each);
results come back in msg_id order with ``take_ready`` (one call for everything done), and a
finished batch's result frames are made in a few NumPy calls (``wire.join_frames``).  Finished
entries are published to the result stream and XACKed, atomically, by one completion script per
publish.  While one batch is on the device the next is read and enqueued, so Redis round trips
overlap the device's work (two batches in flight).  The bridge must be its queue's only producer
and consumer.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..batch import FAILED
from ..errors import QueueFull, check_instance, check_int, check_seconds
from .wire import join_frames
from .worker import _Loop


class _Batch:
    """The entries of one read and their messages: those that fit a slot (``lens``, ``data``,
    ``ends``: byte offsets) take consecutive msg_ids from ``first``; ``fit`` lists their places
    among all messages (None: all fit; the others get no result)."""

    __slots__ = ("entries", "counts", "total", "fit", "lens", "data", "ends", "sent", "first", "taken", "got", "chunks")

    def __init__(self, entries, slot_bytes: int):
        self.entries = entries
        self.counts = [len(e.lens) for e in entries]
        lens = np.concatenate([e.lens for e in entries]).astype(np.uint32, copy=False)
        data = np.frombuffer(b"".join([e.data for e in entries]), np.uint8)
        self.total, self.fit = len(lens), None
        if len(lens) and int(lens.max()) > slot_bytes:  # larger than a slot: reported as failed
            fit = lens <= slot_bytes
            self.fit, data, lens = np.flatnonzero(fit), data[np.repeat(fit, lens)], lens[fit]
        self.lens, self.data = lens, data
        self.ends = np.concatenate(([0], np.cumsum(lens, dtype=np.int64))).tolist() if len(lens) else [0]
        self.sent = self.taken = 0
        self.first = -1
        self.got = np.empty(len(lens), np.uint32)  # the results' lengths, as they come
        self.chunks: list = []  # the results' bytes, back to back over the chunks

    def frames(self) -> tuple[list, int]:
        """(one result frame per entry, failed messages) once every result is in."""
        got = self.got
        if self.fit is not None:
            got = np.full(self.total, FAILED, np.uint32)
            got[self.fit] = self.got
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        return join_frames(self.counts, got, data), int((got == FAILED).sum())


class GpuBridge(_Loop):
    """Feeds ``consumer``'s entries into ``queue`` (a started GpuQueue) and publishes the results.

    One read (``consumer.count`` entries, e.g. 128 frames of 32 messages) is one batch; a batch
    larger than the free slots goes in over several ``enqueue_many`` calls.
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
        self._slot_bytes = queue.config.slot_bytes
        self._batches: deque = deque()  # batches with results outstanding, oldest first
        self._done: list = []  # (entry, result frame) of finished entries, not yet published
        self._held: set = set()  # ids of every entry in here, until published

    def busy(self) -> bool:
        return bool(self._batches or self._done) or super().busy()

    def step(self, block_ms: int | None = None) -> int:
        """One round: read a batch once the last is all enqueued, enqueue, collect results, publish
        finished entries; returns the messages published in this step."""
        if self._unconfirmed is not None:
            return self._complete_again()
        batches = self._batches
        if not self._draining and not (batches and batches[-1].sent < len(batches[-1].lens)):
            wait = 0 if batches or self._done else (self.consumer.block_ms if block_ms is None else block_ms)
            entries = [e for e in self._claim_or_read(wait) if e.id not in self._held]  # not reclaimed from us
            if entries:
                self._held.update(e.id for e in entries)
                batch = _Batch(entries, self._slot_bytes)
                if len(batch.lens):
                    batches.append(batch)
                else:
                    self._finish(batch)
        self._enqueue()
        self._collect()
        if self._done and (
            len(self._done) >= self.publish_batch
            or not batches
            or time.monotonic() - self._done_since >= self.max_wait_s
        ):
            done, self._done = self._done, []
            entries = [e for e, _ in done]
            self._held.difference_update(e.id for e in entries)
            self._publish(entries, [f for _, f in done])
            return sum(map(len, entries))
        return 0

    def _enqueue(self) -> None:
        """As many of the newest batch's messages as there are free slots, in one enqueue_many."""
        if not self._batches:
            return
        b = self._batches[-1]
        k = min(self.queue.free_slots(), len(b.lens) - b.sent)
        if k <= 0:
            return
        i, ends = b.sent, b.ends
        try:
            first = self.queue.enqueue_many(b.data[ends[i] : ends[i + k]], b.lens[i : i + k], timeout=0)
        except QueueFull:
            return
        if i == 0:
            b.first = first
        assert first == b.first + i, "the bridge's queue has another producer"
        b.sent += k

    def _collect(self) -> None:
        """Everything done, in msg_id order, in one take; spread over the batches in flight."""
        first, data, lens = self.queue.take_ready(packed=True, errors="mark")
        k = len(lens)
        if not k:
            return
        ends = np.cumsum(np.where(lens == FAILED, 0, lens), dtype=np.int64).tolist()
        i = start = 0
        while i < k:
            b = self._batches[0]
            take = min(b.sent - b.taken, k - i)
            assert take > 0 and first + i == b.first + b.taken, "the bridge's queue has another consumer"
            end = ends[i + take - 1]
            b.got[b.taken : b.taken + take] = lens[i : i + take]
            b.chunks.append(data[start:end])
            b.taken += take
            i, start = i + take, end
            if b.taken == len(b.lens):
                self._batches.popleft()
                self._finish(b)

    def _finish(self, b: _Batch) -> None:
        frames, failed = b.frames()
        self.stats.failed += failed
        if not self._done:
            self._done_since = time.monotonic()
        self._done += zip(b.entries, frames)
