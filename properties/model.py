"""Reference model of the queue's slot state machine (no GPU, no threads, no memory layout).

A message's life is EMPTY -> READY -> INFLIGHT -> DONE -> EMPTY (device_src/gpuq_layout.cuh).
The ring hands out msg_ids 0, 1, 2, ...; msg_id m lives in slot m % capacity, and a slot is
free again only when every earlier message has been taken (the ring frees in order), so the
ring is full when ``next_id - oldest_untaken == capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMPTY, READY, INFLIGHT, DONE = 0, 1, 2, 3
ORDER = {READY: 0, INFLIGHT: 1, DONE: 2, EMPTY: 3}  # allowed order of states after enqueue


@dataclass
class RingModel:
    capacity: int
    slot_bytes: int
    next_id: int = 0
    payloads: dict[int, bytes] = field(default_factory=dict)  # live (enqueued, not taken, not held)
    taken: set[int] = field(default_factory=set)
    held: dict[int, bytes] = field(default_factory=dict)  # lent to a result view: not free, not takeable
    views: list[tuple[int, int]] = field(default_factory=list)  # (first, n) of the views held, in order

    @property
    def oldest_untaken(self) -> int:
        return min(min(self.payloads, default=self.next_id), min(self.held, default=self.next_id))

    def can_enqueue(self, n: int = 1) -> bool:
        return self.next_id + n - self.oldest_untaken <= self.capacity

    def free_slots(self) -> int:
        return self.capacity - (self.next_id - self.oldest_untaken)

    def enqueue(self, payload: bytes) -> int:
        assert self.can_enqueue() and len(payload) <= self.slot_bytes
        msg_id, self.next_id = self.next_id, self.next_id + 1
        self.payloads[msg_id] = payload
        return msg_id

    def take(self, msg_id: int) -> bytes:
        self.taken.add(msg_id)
        return self.payloads.pop(msg_id)

    def live_run(self, first: int) -> int:
        """How many consecutive msg_ids from ``first`` are live (takeable)."""
        n = 0
        while first + n in self.payloads:
            n += 1
        return n

    def view_start(self) -> int:
        """Where the next result view must start: the end of the last one held, else the oldest
        msg_id not taken (the queue's tail)."""
        if self.views:
            first, n = self.views[-1]
            return first + n
        m = 0
        while m in self.taken:
            m += 1
        return m

    def hold(self, first: int, n: int) -> list[bytes]:
        out = [self.payloads.pop(m) for m in range(first, first + n)]
        self.held.update(zip(range(first, first + n), out))
        self.views.append((first, n))
        return out

    def release(self, first: int, n: int) -> None:
        self.views.remove((first, n))
        for m in range(first, first + n):
            del self.held[m]
            self.taken.add(m)

    @property
    def occupied(self) -> int:
        return self.next_id - len(self.taken)

    def slot(self, msg_id: int) -> int:
        return msg_id % self.capacity
