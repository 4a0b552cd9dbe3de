"""StreamWorker: Track A's loop (consumer group -> BatchProcessor -> result stream), and the
run loop it shares with GpuBridge."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class WorkerStats:
    """Counts since the worker started.  messages/entries: completed here and published or
    found already published (``duplicates`` entries); failed: messages that got no result
    (payload or result larger than a slot, undecodable entry); reclaimed: entries taken over
    from idle consumers; lost: entries trimmed before anyone acked them."""

    messages: int = 0
    entries: int = 0
    failed: int = 0
    reclaimed: int = 0
    duplicates: int = 0
    lost: int = 0


class _Loop:
    """step() until a message count, a stop event, or an idle time; reclaim on a timer."""

    def __init__(self, consumer, reclaim_every_s: float):
        self.consumer, self.reclaim_every_s = consumer, reclaim_every_s
        self.stats = WorkerStats()
        self._next_reclaim = 0.0

    def _claim_or_read(self, block_ms: int) -> list:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_every_s
            got = self.consumer.reclaim()
            self.stats.reclaimed += len(got.entries)
            self.stats.lost += len(got.lost)
            if got.entries:
                return got.entries
        return self.consumer.read(block_ms=block_ms)

    def _count(self, entries, results) -> None:
        published = self.consumer.complete(entries, results)
        self.stats.entries += len(entries)
        self.stats.duplicates += len(entries) - published
        self.stats.messages += sum(len(r) for r in results)
        self.stats.failed += sum(r.count(None) for r in results) + sum(1 for e in entries if e.error)

    def step(self, block_ms: int | None = None) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def busy(self) -> bool:
        return False

    def run(self, *, max_messages: int | None = None, stop=None, idle_exit_s: float | None = None,
            progress=None, progress_every_s: float = 1.0) -> WorkerStats:
        """step() until ``max_messages`` messages are completed, ``stop`` (a threading.Event) is
        set, or nothing arrived for ``idle_exit_s`` seconds; ``progress(stats)`` is called about
        every ``progress_every_s`` seconds.  Returns the stats."""
        last_work = last_report = time.monotonic()
        while not (stop is not None and stop.is_set()):
            if max_messages is not None and self.stats.messages >= max_messages:
                break
            if self.step():
                last_work = time.monotonic()
            elif self.busy():
                last_work = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_work >= idle_exit_s:
                break
            if progress and time.monotonic() - last_report >= progress_every_s:
                last_report = time.monotonic()
                progress(self.stats)
        return self.stats


class StreamWorker(_Loop):
    """Track A: entries from ``consumer`` (a StreamConsumer) go through ``processor`` (a
    BatchProcessor) in batches of up to ``processor.max_batch`` messages; each batch's results
    are published and acked together.  Idle entries are reclaimed every ``reclaim_every_s`` s."""

    def __init__(self, consumer, processor, *, reclaim_every_s: float = 1.0):
        super().__init__(consumer, reclaim_every_s)
        self.processor = processor

    def step(self, block_ms: int | None = None) -> int:
        """Read (or reclaim) one batch of entries, process, publish + ack; returns messages done."""
        entries = self._claim_or_read(self.consumer.block_ms if block_ms is None else block_ms)
        if not entries:
            return 0
        sb, cap = self.processor.slot_bytes, self.processor.max_batch
        results = [[None] * len(e.payloads) for e in entries]
        todo = [(r, i, p) for e, r in zip(entries, results) for i, p in enumerate(e.payloads) if len(p) <= sb]
        for k in range(0, len(todo), cap):
            chunk = todo[k:k + cap]
            for (r, i, _), out in zip(chunk, self.processor.process([p for _, _, p in chunk])):
                r[i] = out
        self._count(entries, results)
        return sum(len(r) for r in results)
