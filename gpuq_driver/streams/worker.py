"""StreamWorker: Track A's loop (consumer group -> BatchProcessor -> result stream), and the
run loop it shares with GpuBridge."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import check_instance, check_int, check_seconds
from .wire import FAILED, join_frame


@dataclass
class WorkerStats:
    """Counts since the worker started.  messages/entries: completed here and published or
    found already published (``duplicates`` entries); failed: messages that got no result
    (payload or result larger than a slot, undecodable entry); reclaimed: entries taken over
    from idle consumers; lost: entries trimmed before anyone acked them.

    A completion that raised (BrokerUnavailable, Ctrl-C: it may have run and only its reply
    been lost) is done again by the next step, before anything is read; its entries are counted
    then, once, and those the second try finds acked are not counted as duplicates (most likely
    the first try published them)."""

    messages: int = 0
    entries: int = 0
    failed: int = 0
    reclaimed: int = 0
    duplicates: int = 0
    lost: int = 0


class _Loop:
    """step() until a message count, a stop event, or an idle time; reclaim on a timer."""

    def __init__(self, consumer, reclaim_every_s: float):
        from .consumer import StreamConsumer

        check_instance("consumer", consumer, StreamConsumer, "a StreamConsumer")
        self.consumer, self.reclaim_every_s = consumer, check_seconds("reclaim_every_s", reclaim_every_s)
        self.stats = WorkerStats()
        self._next_reclaim = 0.0
        self._draining = False
        self._unconfirmed = None  # (entries, frames) of a completion that raised: done again first

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

    def _publish(self, entries, frames) -> None:
        """Publish + ack ``entries`` with their result frames; count entries, messages, duplicates
        and undecodable entries (failed messages are counted where the results are made).

        If it raises, the completion may or may not have happened (a lost connection can lose
        the reply of a script that ran): it is kept and done again by :meth:`_complete_again`,
        which is safe (the acks decide what is published) and counts every entry once."""
        again, self._unconfirmed = self._unconfirmed is not None, (entries, frames)
        published = self.consumer.complete(entries, frames)
        self._unconfirmed = None
        self.stats.entries += len(entries)
        if not again:
            self.stats.duplicates += len(entries) - published
        self.stats.messages += sum(map(len, entries))
        self.stats.failed += sum(1 for e in entries if e.error)

    def _complete_again(self) -> int:
        """Complete again the entries whose completion raised; returns their messages."""
        entries, frames = self._unconfirmed
        self._publish(entries, frames)
        return sum(map(len, entries))

    def step(self, block_ms: int | None = None) -> int:  # pragma: no cover - overridden
        """One round of work; returns the messages published in it."""
        raise NotImplementedError

    def busy(self) -> bool:
        """True while taken work is not yet published (the bridge's messages in flight, or a
        completion that raised)."""
        return self._unconfirmed is not None

    def run(
        self,
        *,
        max_messages: int | None = None,
        stop=None,
        idle_exit_s: float | None = None,
        progress=None,
        progress_every_s: float = 1.0,
    ) -> WorkerStats:
        """step() until ``max_messages`` messages are completed, ``stop`` (a threading.Event) is
        set, or nothing arrived for ``idle_exit_s`` seconds; ``progress(stats)`` is called about
        every ``progress_every_s`` seconds.  Work already taken (the bridge's messages in flight)
        is then finished and published before it returns, without reading more.  Returns the stats."""
        if max_messages is not None:
            check_int("max_messages", max_messages, 0)
        if idle_exit_s is not None:
            check_seconds("idle_exit_s", idle_exit_s)
        check_seconds("progress_every_s", progress_every_s)
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
        self.drain()
        return self.stats

    def drain(self) -> None:
        """Finish and publish everything taken, reading nothing new."""
        self._draining = True
        try:
            while self.busy():
                self.step(block_ms=0)
        finally:
            self._draining = False


class StreamWorker(_Loop):
    """Track A: entries from ``consumer`` (a StreamConsumer) go through ``processor`` (a
    BatchProcessor) in batches of up to ``processor.max_batch`` messages; each batch's results
    are published and acked together.  Idle entries are reclaimed every ``reclaim_every_s`` s."""

    def __init__(self, consumer, processor, *, reclaim_every_s: float = 1.0):
        super().__init__(consumer, reclaim_every_s)
        self.processor = processor

    def step(self, block_ms: int | None = None) -> int:
        """Read (or reclaim) one batch of entries, process, publish + ack; returns messages done."""
        if self._unconfirmed is not None:
            return self._complete_again()
        entries = self._claim_or_read(self.consumer.block_ms if block_ms is None else block_ms)
        if not entries:
            return 0
        cap = self.processor.max_batch
        parts = [[] for _ in entries]  # per entry: (result sizes, result bytes) pieces
        batch, count = [], 0
        for j, e in enumerate(entries):
            lens, data = e.lens, e.data
            while len(lens):  # an entry larger than the room left is split over batches
                take = min(cap - count, len(lens))
                if take == len(lens):
                    batch.append((j, lens, data))
                    lens = ()
                else:
                    nbytes = int(lens[:take].sum(dtype=np.int64))
                    batch.append((j, lens[:take], data[:nbytes]))
                    lens, data = lens[take:], data[nbytes:]
                count += take
                if count == cap:
                    self._run_batch(batch, parts)
                    batch, count = [], 0
        if batch:
            self._run_batch(batch, parts)
        frames = [
            join_frame(*p[0])
            if len(p) == 1
            else join_frame(
                np.concatenate([lens for lens, _ in p]) if p else np.zeros(0, np.uint32), b"".join(d for _, d in p)
            )
            for p in parts
        ]
        self._publish(entries, frames)
        return sum(map(len, entries))

    def _run_batch(self, batch, parts) -> None:
        lens = batch[0][1] if len(batch) == 1 else np.concatenate([b[1] for b in batch])
        data = batch[0][2] if len(batch) == 1 else b"".join(b[2] for b in batch)
        out_lens, out = self.processor.process_packed(lens, data)
        out = bytes(out)
        self.stats.failed += int((out_lens == FAILED).sum())
        sizes = np.where(out_lens == FAILED, 0, out_lens).astype(np.int64)
        msg_ends = np.cumsum([len(b[1]) for b in batch]).tolist()
        byte_ends = np.concatenate(([0], np.cumsum(sizes)))[msg_ends].tolist()
        m0 = b0 = 0
        for (j, _, _), m1, b1 in zip(batch, msg_ends, byte_ends):
            parts[j].append((out_lens[m0:m1], out[b0:b1]))
            m0, b0 = m1, b1
