"""Stateful property test: GpuQueue against the reference model (properties/model.py).

Hypothesis drives random sequences of enqueues (fitting, too large, into a full ring), takes
(in and out of order, twice, of unknown ids) and polls, and the kernel's lifecycle: pause, resume,
and waiting until the kernel has left on its own (its lease ended with nothing to do), so that the
next message has to launch it again.  After every step the invariants are checked: each message's
state only moves forward (READY -> DONE -> EMPTY), results equal their payloads byte for byte,
nothing is reported twice, msg_ids stay consecutive across relaunches, the counters agree with the
model, at most two leases are launched and not ended, and nothing is processed while paused.
It runs on the CPU simulator everywhere, and on the persistent kernel where a GPU exists.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from model import DONE, EMPTY, ORDER, READY, RingModel

from gpuq_driver import GpuQueue, PayloadError, QueueConfig, QueueFull
from tests.conftest import gpu_unavailable_reason

CAPACITY, SLOT_BYTES = 8, 48
LEASE_MS = 1.0
LINGER_MS = 5.0  # short: the kernel lingers after a message (no producer launch), then parks


def make_machine(backend: str):
    class QueueMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.q = GpuQueue(
                QueueConfig(
                    capacity=CAPACITY, slot_bytes=SLOT_BYTES, backend=backend, lease_ms=LEASE_MS, linger_ms=LINGER_MS
                )
            )
            self.model = RingModel(CAPACITY, SLOT_BYTES)
            self.seen: dict[int, int] = {}  # msg_id -> last observed state
            self.reported: set[int] = set()
            self.paused_at: int | None = None  # processed count when pause() returned
            self.pauses_in_force = 0  # pauses nest: as many resumes undo them

        def teardown(self):
            self.q.close()

        def observed_state(self, msg_id: int) -> int:
            if msg_id in self.model.taken:
                return EMPTY
            slot = self.model.slot(msg_id)
            return DONE if self.q._res_hdr[2 * slot + 1] == msg_id else READY

        @rule(payload=st.binary(max_size=SLOT_BYTES))
        def enqueue(self, payload):
            if self.model.can_enqueue():
                assert self.q.enqueue(payload, timeout=0) == self.model.enqueue(payload)
            else:
                with pytest.raises(QueueFull):
                    self.q.enqueue(payload, timeout=0)

        @rule(extra=st.integers(1, 64))
        def enqueue_too_large(self, extra):
            with pytest.raises(PayloadError):
                self.q.enqueue(bytes(SLOT_BYTES + extra), timeout=0)

        @precondition(lambda self: self.model.payloads)
        @rule(data=st.data())
        def take(self, data):
            msg_id = data.draw(st.sampled_from(sorted(self.model.payloads)))
            if self.paused_at is not None and self.observed_state(msg_id) != DONE:
                with pytest.raises(TimeoutError):  # parked: it waits for resume()
                    self.q.wait_result(msg_id, timeout=0.005)
                return
            assert self.q.wait_result(msg_id, timeout=10) == self.model.take(msg_id)

        @rule()
        def pause(self):
            self.q.pause(timeout=10)
            s = self.q.stats()
            assert s.kernel == "paused" and s.exits == s.launches
            if self.paused_at is None:
                self.paused_at = s.processed
            self.pauses_in_force += 1

        @rule()
        def resume(self):
            self.q.resume()
            self.pauses_in_force = max(0, self.pauses_in_force - 1)
            if not self.pauses_in_force:
                self.paused_at = None

        @rule()
        def let_the_kernel_leave(self):
            """Idle for a few leases: with nothing left to do the kernel parks itself."""
            deadline = time.monotonic() + 5
            while True:
                s = self.q.stats()
                if s.exits == s.launches and (s.pending == 0 or self.paused_at is not None):
                    break
                assert time.monotonic() < deadline, f"the kernel did not leave: {s}"
                time.sleep(LEASE_MS / 1e3)
            assert s.kernel == ("paused" if self.paused_at is not None else "parked")

        @rule(msg_id=st.integers(0, 40))
        def take_unknown_or_taken(self, msg_id):
            if msg_id in self.model.payloads:
                return
            assert self.q.try_dequeue_result(msg_id) is None

        @rule()
        def poll(self):
            ids = self.q.poll_completions()
            assert ids == sorted(ids)
            assert not set(ids) & self.reported, "a completion was reported twice"
            assert set(ids) <= set(self.model.payloads), "a completion for a taken or unknown msg_id"
            self.reported.update(ids)

        @invariant()
        def states_only_move_forward(self):
            for msg_id in list(self.model.payloads) + list(self.model.taken):
                state = self.observed_state(msg_id)
                before = self.seen.get(msg_id, READY)
                assert ORDER[state] >= ORDER[before], f"msg {msg_id} went from {before} back to {state}"
                self.seen[msg_id] = state

        @invariant()
        def counters_agree(self):
            s = self.q.stats()
            assert s.enqueued == self.model.next_id
            assert s.taken == len(self.model.taken)
            assert s.occupied == self.model.occupied <= CAPACITY
            assert 0 <= s.processed <= s.enqueued
            assert 1 <= s.launches and 0 <= s.launches - s.exits <= 2

        @invariant()
        def nothing_is_processed_while_paused(self):
            if self.paused_at is not None:
                assert self.q.stats().processed == self.paused_at

    QueueMachine.__name__ = f"QueueMachine_{backend}"
    return QueueMachine


SETTINGS = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

TestQueueOnSimulator = make_machine("sim").TestCase
TestQueueOnSimulator.settings = SETTINGS

_reason = gpu_unavailable_reason()
if _reason is None:
    TestQueueOnGpu = pytest.mark.gpu(make_machine("cuda").TestCase)
    TestQueueOnGpu.settings = SETTINGS
else:

    @pytest.mark.gpu
    @pytest.mark.skip(reason=_reason)
    def test_queue_state_machine_on_gpu():
        """The same state machine against the persistent kernel (needs a GPU)."""
