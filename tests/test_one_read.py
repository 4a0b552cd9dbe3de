"""The one-read path (issue 11; gpuq_layout.cuh, "One read"): the front warp serves a message from
its read of the slot when the host's check holds, and reads a torn or stale slot again.

To show that path alone, these tests keep the doorbell from moving (the host's store to it is
dropped): the kernel then learns of a message only by reading its slot.  On the simulator and,
where a GPU exists, on the real kernel.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

import gpuq_driver.queue as queue_module
from gpuq_driver.layout import DOORBELL_HEAD_MASK


class FrozenDoorbell:
    """Stands in for GpuQueue._doorbell: reads see the real doorbell, the host's stores are dropped."""

    def __init__(self, real):
        self.real = real

    def __getitem__(self, i):
        return self.real[i]

    def __setitem__(self, i, value):
        pass


def freeze(q):
    q._doorbell = FrozenDoorbell(q._doorbell)


def thaw(q):
    """Put the real doorbell back and ring it with the producers' head."""
    real = q._doorbell.real
    q._doorbell = real
    real[0] = (real[0] & ~DOORBELL_HEAD_MASK) | q._head


def payloads(n: int, max_bytes: int, seed: int) -> list[bytes]:
    """Mixed sizes: empty, around the 16-byte chunks and the 64-byte window, up to max_bytes."""
    rng = np.random.default_rng(seed)
    edges = [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 511, 512, max_bytes - 1, max_bytes]
    sizes = [e for e in edges if e <= max_bytes] + list(rng.integers(0, max_bytes + 1, n))
    return [rng.bytes(int(k)) for k in sizes[:n]]


@pytest.mark.parametrize("scouts", [0, 1])
def test_served_from_the_slot_alone(make_queue, scouts):
    """Messages of at most 64 bytes (the one read's window) need no doorbell at all, whether the
    front warp or a scout (QueueConfig.scouts) reads them first."""
    q = make_queue(capacity=256, slot_bytes=1024, linger_ms=1000.0, one_read=True, scouts=scouts)
    freeze(q)
    sent = payloads(300, 64, 1)
    for p in sent:
        msg_id = q.enqueue(p)
        assert q.wait_result(msg_id, timeout=10) == p  # with the doorbell still at 0
    assert q._doorbell.real[0] & DOORBELL_HEAD_MASK == 0
    thaw(q)
    q.shutdown()  # the lease ends: the device's counters are exact
    st = q.stats()
    # each served once from a read that held; a read made while the host wrote the slot is torn
    # and read again (rare: 0.1-0.6 in 10,000 one-reads with a scout, benchmarks/NOTES.md)
    assert st.spec_reads == len(sent) and st.spec_retries <= len(sent) // 20


@pytest.mark.parametrize("one_read, size", [(False, 40), (True, 65), (True, 1000)])
def test_otherwise_the_doorbell_is_needed(make_queue, one_read, size):
    """Unchecked (one_read=False) or longer than 64 bytes: the slot alone is not enough."""
    q = make_queue(capacity=64, slot_bytes=1024, one_read=one_read, linger_ms=1000.0)
    freeze(q)
    msg_id = q.enqueue(b"x" * size)
    time.sleep(0.05)
    assert q.try_dequeue_result(msg_id) is None
    thaw(q)
    assert q.wait_result(msg_id, timeout=10) == b"x" * size
    q.shutdown()
    assert q.stats().spec_reads == 0


def test_after_an_unchecked_message_the_front_warp_polls_the_doorbell_alone(make_queue):
    """The front warp reads the slot in its polls only while the last message served was checked
    (GpuqDevState.unchecked), so that a stream of longer or unchecked messages costs its polls no
    slot reads: a checked message after an unchecked one needs the doorbell once, and the one
    after it the slot alone again."""
    q = make_queue(capacity=64, slot_bytes=256, linger_ms=1000.0, one_read=True)
    small = bytes(range(40))
    freeze(q)
    assert q.wait_result(q.enqueue(small), timeout=10) == small  # the slot alone
    big = q.enqueue(bytes(100))  # unchecked (longer than 64 bytes): the doorbell serves it
    time.sleep(0.05)
    assert q.try_dequeue_result(big) is None
    thaw(q)
    assert q.wait_result(big, timeout=10) == bytes(100)
    freeze(q)
    msg_id = q.enqueue(small)  # checked, but the front warp no longer reads the slot
    time.sleep(0.05)
    assert q.try_dequeue_result(msg_id) is None
    thaw(q)
    assert q.wait_result(msg_id, timeout=10) == small
    freeze(q)
    assert q.wait_result(q.enqueue(small), timeout=10) == small  # the slot alone again
    thaw(q)
    q.shutdown()
    assert q.stats().spec_reads == 2


@pytest.mark.parametrize("scouts", [0, 1, 2])
def test_a_slot_whose_check_fails_is_read_again_and_never_served(make_queue, monkeypatch, scouts):
    """A stale or torn read looks like a header whose check does not hold over the bytes read: the
    device must count it, read again, and serve the message only once the doorbell shows it (a
    scout that won the message waits for it as its front, and leases still end meanwhile)."""
    q = make_queue(capacity=64, slot_bytes=256, linger_ms=1000.0, one_read=True, scouts=scouts)
    freeze(q)
    monkeypatch.setattr(queue_module, "crc32", lambda data, seed: zlib.crc32(data, seed) ^ 0x100)
    payload = bytes(range(48))
    msg_id = q.enqueue(payload)
    deadline = time.monotonic() + 5
    while q.stats().spec_retries < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert q.stats().spec_retries >= 3
    assert q.try_dequeue_result(msg_id) is None
    thaw(q)
    assert q.wait_result(msg_id, timeout=10) == payload
    q.shutdown()
    assert q.stats().spec_reads == 0


def test_the_simulator_serves_checked_messages_from_the_one_read():
    """As the device's front warp does with the slot it read beside the doorbell: checked messages
    (one_read, <= 64 bytes) are served from that read, except those a lease's last read (the
    doorbell alone) covers; longer ones never are."""
    import gpuq_driver

    q = gpuq_driver.GpuQueue(gpuq_driver.QueueConfig(backend="sim", capacity=64, slot_bytes=128, one_read=True))
    try:
        sent = payloads(60, 128, 4)
        for p in sent:
            assert q.wait_result(q.enqueue(p), timeout=10) == p
        q.shutdown()
        st = q.stats()
        assert 0 < st.spec_reads <= sum(len(p) <= 64 for p in sent) and st.spec_retries == 0
    finally:
        q.close()


def test_torn_reads_are_caught_on_the_simulator():
    """The simulator garbles a 16-byte chunk of half its slot reads: every one is caught by the
    check (counted, read again) and every result is still right."""
    import gpuq_driver

    q = gpuq_driver.GpuQueue(
        gpuq_driver.QueueConfig(backend="sim", capacity=128, slot_bytes=512, linger_ms=1000.0, one_read=True)
    )
    try:
        q._kernel.tear_rate = 0.5
        freeze(q)
        sent = payloads(400, 64, 2)
        for p in sent:
            assert q.wait_result(q.enqueue(p), timeout=10) == p
        thaw(q)
        q.shutdown()
        st = q.stats()
        assert st.spec_reads == len(sent)
        assert st.spec_retries > 50  # about one per served message
    finally:
        q.close()


@pytest.mark.parametrize("one_read, scouts", [(True, 0), (True, 1), (True, 2), (False, 0)])
def test_many_producers_mixed_sizes(make_queue, backend, one_read, scouts):
    """Many producers, sizes across the 16- and 64-byte lines: every result right, each exactly
    once (the torn-read stress; benchmarks/stress_one_read.py runs 10 M)."""
    import threading

    n_threads, per = 4, 2000 if backend == "cuda" else 300
    # a ring that holds every message: a producer holds its window untaken while it enqueues, so
    # in a smaller ring the others could lap it by a whole ring meanwhile (a GIL-starved thread)
    # and its next enqueue would wait for its own result (QueueFull); stress_one_read.py wraps
    q = make_queue(capacity=8192, slot_bytes=512, one_read=one_read, scouts=scouts)
    q._check_depth = 1 << 62  # every message of <= 64 B checked, though others are in flight
    errors: list = []

    def producer(t):
        try:
            sent, window = payloads(per, 512, 100 + t), []
            for k, p in enumerate(sent):  # up to 16 in flight per producer
                window.append((q.enqueue(p, timeout=10), p))
                if len(window) == 16 or k == len(sent) - 1:
                    for i, want in window:
                        got = q.wait_result(i, timeout=10)
                        if got != want:
                            errors.append((i, len(want), len(got)))
                    window.clear()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    q.shutdown()
    st = q.stats()
    assert st.processed == n_threads * per
    if not one_read:
        assert st.spec_reads == 0 and st.spec_retries == 0


def checked(q, msg_id: int) -> bool:
    """Whether enqueue put the slot check in msg_id's request header."""
    from gpuq_driver import layout

    return bool(q._req_hdr[2 * (msg_id & q._mask)] >> 32 & layout.REQ_CHECKED)


def test_enqueue_checks_only_where_the_front_warp_may_wait_for_the_message(make_queue):
    """The check costs enqueue ~0.3 µs and helps only a message the front warp may be polling for:
    it is made for the message the front warp polls for (GpuqCtrlDev.front) and the one after;
    behind a longer backlog the doorbell serves the message anyway.  Every result stays right."""
    q = make_queue(capacity=64, slot_bytes=128, linger_ms=1000.0, one_read=True)
    p = bytes(range(40))

    def front_reaches(msg_id):  # the front warp's store may land just after the result
        deadline = time.monotonic() + 10
        while q._front[0] != msg_id and time.monotonic() < deadline:
            time.sleep(0.001)
        return q._front[0] == msg_id

    assert q.wait_result(q.enqueue(p), timeout=10) == p
    assert front_reaches(1)
    with q.paused():  # nothing is processed: the backlog stays
        ids = [q.enqueue(p) for _ in range(4)]
        assert [checked(q, i) for i in ids] == [True, True, False, False]
    done, deadline = [], time.monotonic() + 10
    while len(done) < len(ids) and time.monotonic() < deadline:  # done, none taken
        done += q.poll_completions()
    assert sorted(done) == ids
    assert front_reaches(ids[-1] + 1)  # the front warp polls for the next message (or did, as it left)
    with q.paused():  # none taken, but the front warp is at the next one: checked, up to the one after
        later = [q.enqueue(p) for _ in range(3)]
        assert [checked(q, i) for i in later] == [True, True, False]
    assert all(q.wait_result(i, timeout=10) == p for i in ids + later)
    q._check_depth = 1 << 62  # what the torn-read stress sets: every message checked
    with q.paused():
        forced = [q.enqueue(p) for _ in range(4)]
        assert [checked(q, i) for i in forced] == [True] * 4
    assert all(q.wait_result(i, timeout=10) == p for i in forced)
    q._check_depth = 2
    assert front_reaches(forced[-1] + 1)
    n = q.enqueue(p)  # idle again
    assert checked(q, n) and q.wait_result(n, timeout=10) == p


def test_enqueue_writes_request_words_header():
    """enqueue's inlined header stores (len, then the flags word (crc | 0xFF) ^ CHECK_LOW, then
    msg_id) give the word layout.request_word makes from layout.slot_check, for every length of
    the check's window, and READY alone past it (the real enqueue, not a copy of its expression)."""
    import gpuq_driver
    from gpuq_driver import layout

    q = gpuq_driver.GpuQueue(gpuq_driver.QueueConfig(backend="sim", capacity=256, slot_bytes=128, one_read=True))
    try:
        freeze(q)  # nothing is served: the headers stay as the host wrote them
        q._check_depth = 1 << 62  # every message checked, though the earlier ones are not done
        rng = np.random.default_rng(5)
        for n in [*range(65), 65, 100, 128]:
            p = rng.bytes(n)
            msg_id = q.enqueue(p)
            slot = msg_id & 255
            check = layout.slot_check(p, msg_id, n) if n <= 64 else None
            assert q._req_hdr[2 * slot] == layout.request_word(n, check), n
            assert q._req_hdr[2 * slot + 1] == msg_id
    finally:
        thaw(q)  # also after a failure: close() drains
        q.close()
