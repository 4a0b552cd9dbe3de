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
    payloads: dict[int, bytes] = field(default_factory=dict)  # live (enqueued, not taken)
    taken: set[int] = field(default_factory=set)

    @property
    def oldest_untaken(self) -> int:
        return min(self.payloads, default=self.next_id)

    def can_enqueue(self) -> bool:
        return self.next_id - self.oldest_untaken < self.capacity

    def enqueue(self, payload: bytes) -> int:
        assert self.can_enqueue() and len(payload) <= self.slot_bytes
        msg_id, self.next_id = self.next_id, self.next_id + 1
        self.payloads[msg_id] = payload
        return msg_id

    def take(self, msg_id: int) -> bytes:
        self.taken.add(msg_id)
        return self.payloads.pop(msg_id)

    @property
    def occupied(self) -> int:
        return self.next_id - len(self.taken)

    def slot(self, msg_id: int) -> int:
        return msg_id % self.capacity
