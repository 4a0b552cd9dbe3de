"""Stateful property test: GpuQueue against the reference model (properties/model.py).

Hypothesis drives random sequences of enqueues (fitting, too large, into a full ring), takes
(in and out of order, twice, of unknown ids) and polls, the batch calls (enqueue_many in every
form, of any size, wrapping at the ring's end or not fitting; reserve/commit of a prefix, or
cancel; take_results of a range; result views held across steps and released in any order;
take_ready), and the kernel's lifecycle: pause, resume,
and waiting until the kernel has left on its own (its lease ended with nothing to do), so that the
next message has to launch it again.  After every step the invariants are checked: each message's
state only moves forward (READY -> DONE -> EMPTY), results equal their payloads byte for byte,
nothing is reported twice, msg_ids stay consecutive across relaunches, the counters agree with the
model, at most two leases are launched and not ended, and nothing is processed while paused.
It runs on the CPU simulator everywhere, and on the persistent kernel where a GPU exists.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from model import DONE, EMPTY, ORDER, READY, RingModel

from gpuq_driver import GpuQueue, PayloadError, QueueConfig, QueueFull, ResultTimeout, UnknownMessage
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
                    capacity=CAPACITY,
                    slot_bytes=SLOT_BYTES,
                    backend=backend,
                    lease_ms=LEASE_MS,
                    linger_ms=LINGER_MS,
                    one_read=True,  # the one read's protocol too (gpuq_layout.cuh)
                    scouts=1,  # and a scout beside the front warp (bids; ignored by the simulator)
                )
            )
            self.model = RingModel(CAPACITY, SLOT_BYTES)
            self.seen: dict[int, int] = {}  # msg_id -> last observed state
            self.reported: set[int] = set()
            self.paused_at: int | None = None  # processed count when pause() returned
            self.pauses_in_force = 0  # pauses nest: as many resumes undo them
            self.views: list = []  # ResultViews held across steps, with the payloads they must show
            self.retries_seen = 0

        def teardown(self):
            self.q.close()

        def observed_state(self, msg_id: int) -> int:
            if msg_id in self.model.taken:
                return EMPTY
            if msg_id in self.model.held:
                return DONE
            slot = self.model.slot(msg_id)
            return DONE if self.q._res_hdr[2 * slot + 1] == msg_id else READY

        @rule(payload=st.binary(max_size=SLOT_BYTES))
        def enqueue(self, payload):
            if self.model.can_enqueue():
                assert self.q.enqueue(payload, timeout=0) == self.model.enqueue(payload)
            else:
                with pytest.raises(QueueFull):
                    self.q.enqueue(payload, timeout=0)

        @rule(rate=st.sampled_from([0.0, 0.3, 1.0]))
        def tear_slot_reads(self, rate):
            """The simulator garbles that share of the front warp's one-reads (gpuq_layout.cuh, "One
            read"): each must fail its check and be read again, so no result may change."""
            if backend == "sim":
                self.q._kernel.tear_rate = rate

        @rule(every=st.booleans())
        def check_every_message(self, every):
            """enqueue checks a message only where the front warp may be waiting for it (no backlog
            before it); or every message, as the torn-read stress has it: no result may change."""
            self.q._check_depth = 1 << 62 if every else 2

        @rule(extra=st.integers(1, 64))
        def enqueue_too_large(self, extra):
            with pytest.raises(PayloadError):
                self.q.enqueue(bytes(SLOT_BYTES + extra), timeout=0)

        # -- batch calls --------------------------------------------------------------------------

        @rule(data=st.data(), n=st.integers(0, CAPACITY + 1), form=st.sampled_from(["rows", "packed", "list"]))
        def enqueue_many(self, data, n, form):
            if form == "rows":
                size = data.draw(st.integers(0, SLOT_BYTES))
                msgs = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(n)]
                args = (np.frombuffer(b"".join(msgs), np.uint8).reshape(n, size),)
            else:
                msgs = [data.draw(st.binary(max_size=SLOT_BYTES)) for _ in range(n)]
                args = (msgs,) if form == "list" else (b"".join(msgs), [len(m) for m in msgs])
            before = self.q.stats().enqueued
            if n > CAPACITY:
                with pytest.raises(PayloadError, match="exceeds capacity"):
                    self.q.enqueue_many(*args, timeout=0)
            elif self.model.can_enqueue(n):
                assert self.q.enqueue_many(*args, timeout=0) == self.model.next_id
                for m in msgs:
                    self.model.enqueue(m)
                return
            else:
                with pytest.raises(QueueFull, match=f"{self.model.free_slots()} of {CAPACITY} slots are free"):
                    self.q.enqueue_many(*args, timeout=0)
            assert self.q.stats().enqueued == before  # all or nothing

        @rule(data=st.data(), n=st.integers(1, CAPACITY + 2))
        def reserve_commit(self, data, n):
            k = min(n, CAPACITY - self.model.next_id % CAPACITY)
            if not self.model.can_enqueue(k):
                with pytest.raises(QueueFull):
                    self.q.reserve(n, timeout=0)
                return
            # every draw before the reservation: a draw may stop the example (Hypothesis's StopTest)
            msgs = [data.draw(st.binary(max_size=SLOT_BYTES)) for _ in range(k)]
            count = data.draw(st.integers(0, k))
            commit = data.draw(st.booleans())
            r = self.q.reserve(n, timeout=0)
            assert (r.first, len(r)) == (self.model.next_id, k)
            for i, m in enumerate(msgs):
                r.data[i, : len(m)] = np.frombuffer(m, np.uint8)
            if commit:
                r.commit([len(m) for m in msgs[:count]], n=count)
            else:
                r.cancel()
                count = 0
            for m in msgs[:count]:
                self.model.enqueue(m)

        def wait_processed(self) -> None:
            deadline = time.monotonic() + 10
            while self.q.stats().processed < self.model.next_id:
                assert time.monotonic() < deadline, "the kernel did not process what was enqueued"
                time.sleep(1e-4)

        def done_while_paused(self, first: int, n: int) -> bool:
            """While paused, exactly the messages enqueued before the pause are done (pause waits
            for them): a fact of the model, so that what the rules draw never depends on timing."""
            return first + n <= self.paused_at

        @precondition(lambda self: self.model.payloads)
        @rule(data=st.data())
        def take_batch(self, data):
            first = data.draw(st.sampled_from(sorted(self.model.payloads)))
            n = data.draw(st.integers(1, self.model.live_run(first)))
            packed = data.draw(st.booleans())  # every draw before what depends on timing
            if self.paused_at is not None and not self.done_while_paused(first, n):
                with pytest.raises(ResultTimeout):
                    self.q.take_results(first, n, timeout=0.005)
                return
            got, lens = self.q.take_results(first, n, timeout=10, packed=packed)
            want = [self.model.take(m) for m in range(first, first + n)]
            assert list(lens) == [len(w) for w in want]
            if packed:
                assert got.tobytes() == b"".join(want)
            else:
                assert [bytes(got[i, : len(w)]) for i, w in enumerate(want)] == want

        @rule(msg_id=st.integers(0, 40), n=st.integers(1, 4))
        def take_batch_unknown_or_taken(self, msg_id, n):
            if all(m in self.model.payloads for m in range(msg_id, msg_id + n)):
                return
            with pytest.raises(UnknownMessage):
                self.q.take_results(msg_id, n, timeout=0)

        @rule(data=st.data())
        def open_view(self, data):
            first = self.model.view_start()
            run = self.model.live_run(first)
            if not run:
                return
            n = data.draw(st.integers(1, run))
            k = min(n, CAPACITY - first % CAPACITY)
            if self.paused_at is not None and not self.done_while_paused(first, k):
                return
            v = self.q.view_results(first, n, timeout=10)
            assert (v.first, len(v)) == (first, k)
            want = self.model.hold(first, k)
            assert [bytes(v.data[i, : v.lengths[i]]) for i in range(k)] == want
            self.views.append((v, want))

        @precondition(lambda self: self.views)
        @rule(data=st.data())
        def release_view(self, data):
            v, want = self.views.pop(data.draw(st.integers(0, len(self.views) - 1)))
            assert [bytes(v.data[i, : v.lengths[i]]) for i in range(len(v))] == want  # unchanged while held
            v.release()
            self.model.release(v.first, len(v))

        @rule(max_items=st.one_of(st.none(), st.integers(0, CAPACITY)))
        def take_ready(self, max_items):
            if self.paused_at is None:  # what is ready follows from the model: everything, or
                self.wait_processed()  # (paused) what was enqueued before the pause
            start = self.model.view_start()
            while start in self.model.taken:
                start += 1
            ready = self.model.live_run(start)
            if self.paused_at is not None:
                ready = max(0, min(ready, self.paused_at - start))
            first, got, lens = self.q.take_ready(max_items)
            assert first == start and len(lens) == (ready if max_items is None else min(ready, max_items))
            want = [self.model.take(m) for m in range(first, first + len(lens))]
            assert [bytes(got[i, :m]) for i, m in enumerate(lens.tolist())] == want

        @rule()
        def free_slots_agree(self):
            assert self.q.free_slots() == self.model.free_slots()

        # -- single calls ---------------------------------------------------------------------------

        @precondition(lambda self: self.model.payloads)
        @rule(data=st.data())
        def take(self, data):
            msg_id = data.draw(st.sampled_from(sorted(self.model.payloads)))
            if self.paused_at is not None and not self.done_while_paused(msg_id, 1):
                with pytest.raises(TimeoutError):  # parked: it waits for resume()
                    self.q.wait_result(msg_id, timeout=0.005)
                return
            assert self.q.wait_result(msg_id, timeout=10) == self.model.take(msg_id)

        @rule()
        def pause(self):
            if self.paused_at is None:  # let the kernel finish first, so that what is done while
                self.wait_processed()  # paused follows from the model (deterministic draws)
            self.q.pause(timeout=10)
            s = self.q.stats()
            assert s.kernel == "paused" and s.exits == s.launches
            if self.paused_at is None:
                self.paused_at = s.processed
                assert s.processed == self.model.next_id
            self.pauses_in_force += 1

        @rule()
        def resume(self):
            self.q.resume()
            self.pauses_in_force = max(0, self.pauses_in_force - 1)
            if not self.pauses_in_force:
                self.paused_at = None

        @rule()
        def let_the_kernel_leave(self):
            """Idle for a few leases: with nothing left to do the kernel parks itself (after
            LINGER_MS, during which the keeper may still launch a lease in a gap between two:
            every lease ended is not yet parked, so wait for the state itself)."""
            want = "paused" if self.paused_at is not None else "parked"
            deadline = time.monotonic() + 5
            while True:
                s = self.q.stats()
                if s.exits == s.launches and (s.pending == 0 or self.paused_at is not None) and s.kernel == want:
                    break
                assert time.monotonic() < deadline, f"the kernel did not leave: {s}"
                time.sleep(LEASE_MS / 1e3)

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
            if backend == "sim":  # exact there (on the GPU a running lease's copy may lag or lead by one)
                assert s.spec_reads <= s.processed
                assert s.spec_retries >= self.retries_seen
                self.retries_seen = s.spec_retries

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
