"""GpuQueue behaviour, on the CPU simulator everywhere and on the persistent kernel where a GPU exists."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpuq_driver import (
    ConfigError,
    GpuqError,
    GpuQueue,
    PayloadError,
    PayloadTypeError,
    QueueClosed,
    QueueConfig,
    QueueFull,
    QueueStats,
    ResultTimeout,
    UnknownMessage,
)


def drain(q: GpuQueue, ids, timeout=10.0) -> dict[int, bytes]:
    return {i: q.wait_result(i, timeout) for i in ids}


def test_lifecycle(make_queue, backend):
    q = make_queue(capacity=16, slot_bytes=64)
    assert repr(q).startswith(f"<GpuQueue {backend}")
    s = q.stats()
    assert isinstance(s, QueueStats) and s.enqueued == 0 and s.backend == backend
    assert s.kernel in ("running", "parked") and s.launches >= 1  # the first lease may be over already
    mid = q.enqueue(b"hello")
    assert mid == 0
    assert q.wait_result(mid) == b"hello"
    assert q.try_dequeue_result(mid) is None  # taken once only
    q.shutdown()
    assert q.stats().kernel == "exited"
    q.shutdown()  # twice is fine
    with pytest.raises(QueueClosed):
        q.enqueue(b"late")
    q.close()
    q.close()
    assert q.closed
    with pytest.raises(QueueClosed):
        q.try_dequeue_result(0)
    with pytest.raises(QueueClosed):
        q.stats()


def test_context_manager_closes(backend):
    with GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend=backend)) as q:
        q.wait_result(q.enqueue(b"x" * 16))
    assert q.closed


def test_random_payloads_byte_for_byte(make_queue, backend):
    """100,000 payloads of random length 0..slot_bytes on the GPU (5,000 on the simulator)."""
    count = 100_000 if backend == "cuda" else 5_000
    sb = 512
    q = make_queue(capacity=1024, slot_bytes=sb)
    rng = random.Random(1234)
    sent: dict[int, bytes] = {}
    got: dict[int, bytes] = {}
    for _ in range(count):
        p = rng.randbytes(rng.randint(0, sb))
        while True:
            try:
                sent[q.enqueue(p, timeout=0)] = p
                break
            except QueueFull:
                for i in q.poll_completions():
                    got[i] = q.try_dequeue_result(i)
    for i in sent.keys() - got.keys():
        got[i] = q.wait_result(i, 10.0)
    assert len(got) == count
    assert [i for i in sent if got[i] != sent[i]] == []
    s = q.stats()
    assert s.enqueued == s.processed == s.taken == count and s.occupied == 0


def test_ring_wraps_many_times(make_queue):
    q = make_queue(capacity=8, slot_bytes=32)
    for i in range(4000):  # 500 laps of the ring
        p = i.to_bytes(4, "little") * (i % 9)
        assert q.wait_result(q.enqueue(p)) == p


def test_full_ring_backpressure(make_queue):
    q = make_queue(capacity=4, slot_bytes=16)
    ids = [q.enqueue(bytes([i]) * 3) for i in range(4)]
    with pytest.raises(QueueFull, match="4 slots"):
        q.enqueue(b"no room", timeout=0)
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        q.enqueue(b"no room", timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert q.stats().enqueued == 4  # the refused messages were not enqueued
    # a consumer frees a slot while the producer waits: the enqueue then succeeds
    threading.Timer(0.05, lambda: q.wait_result(ids[0])).start()
    late = q.enqueue(b"room now", timeout=5)
    assert late == 4
    assert [q.wait_result(i) for i in ids[1:]] == [bytes([i]) * 3 for i in range(1, 4)]
    assert q.wait_result(late) == b"room now"


def test_out_of_order_take_frees_in_order(make_queue):
    q = make_queue(capacity=4, slot_bytes=16)
    ids = [q.enqueue(bytes([i])) for i in range(4)]
    assert q.wait_result(ids[2]) == b"\x02"
    assert q.wait_result(ids[1]) == b"\x01"
    with pytest.raises(QueueFull):  # slot 0 still holds an untaken result
        q.enqueue(b"x", timeout=0)
    assert q.poll_completions() == [0, 3]
    assert q.wait_result(ids[0]) == b"\x00"
    # 0, 1, 2 are now taken: three slots free
    more = [q.enqueue(b"y", timeout=0) for _ in range(3)]
    assert more == [4, 5, 6]
    with pytest.raises(KeyError):
        q.wait_result(ids[1])


def test_poll_reports_each_once(make_queue):
    q = make_queue(capacity=64, slot_bytes=16)
    ids = [q.enqueue(bytes([i])) for i in range(50)]
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while len(seen) < 50 and time.monotonic() < deadline:
        seen += q.poll_completions(max_items=7)
    assert seen == ids
    assert q.poll_completions() == []
    assert all(q.try_dequeue_result(i) == bytes([i]) for i in ids)


def test_shutdown_drains_messages_in_flight(make_queue, backend):
    q = make_queue(capacity=2048, slot_bytes=64)
    if backend == "sim":
        q._kernel.delay_s = 1e-4  # keep messages in flight when shutdown starts
    payloads = [i.to_bytes(8, "little") * 8 for i in range(2000)]
    ids = [q.enqueue(p) for p in payloads]
    assert q.stats().pending > 0 or backend == "cuda"
    q.shutdown()  # drain=True: every enqueued message is processed first
    s = q.stats()
    assert s.kernel == "exited" and s.processed == 2000 and s.pending == 0
    assert [q.try_dequeue_result(i) for i in ids] == payloads


def test_shutdown_abort_stops_without_draining(make_queue, backend):
    q = make_queue(capacity=4096, slot_bytes=16)
    if backend == "sim":
        q._kernel.delay_s = 2e-3
    ids = [q.enqueue(b"a") for _ in range(4000)]
    q.shutdown(drain=False)
    s = q.stats()
    assert s.kernel == "exited"
    lost = [i for i in ids if q.try_dequeue_result(i) is None]
    assert len(ids) - len(lost) == s.processed  # a result exists exactly for each processed message
    if backend == "sim":
        assert s.processed < 4000
    if lost:  # the GPU may have finished them all before the abort landed
        t0 = time.monotonic()
        with pytest.raises(GpuqError, match="never will be"):  # not a wait for the whole timeout
            q.wait_result(lost[-1], timeout=30)
        assert time.monotonic() - t0 < 1


def test_two_producer_threads(make_queue, backend):
    per_thread = 50_000 if backend == "cuda" else 3_000
    q = make_queue(capacity=256, slot_bytes=32)
    results: dict[int, bytes] = {}
    sent: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def producer(tag: int):
        for i in range(per_thread):
            p = bytes([tag]) + i.to_bytes(4, "little")
            mid = q.enqueue(p, timeout=10)
            with lock:
                sent[mid] = p

    def consumer():
        while not stop.is_set() or len(results) < 2 * per_thread:
            for mid in q.poll_completions():
                results[mid] = q.try_dequeue_result(mid)
            time.sleep(0)

    c = threading.Thread(target=consumer)
    c.start()
    ps = [threading.Thread(target=producer, args=(t,)) for t in (1, 2)]
    for t in ps:
        t.start()
    for t in ps:
        t.join()
    stop.set()
    c.join(60)
    assert not c.is_alive()
    assert len(sent) == len(results) == 2 * per_thread
    assert sorted(sent) == list(range(2 * per_thread))
    assert all(results[m] == p for m, p in sent.items())
    for tag in (1, 2):  # each producer's messages kept their order
        mine = [m for m in sorted(sent) if sent[m][0] == tag]
        assert [int.from_bytes(sent[m][1:], "little") for m in mine] == list(range(per_thread))


@pytest.mark.parametrize("call, capacity", [("poll", 4096), ("take", 4096), ("poll", 64), ("stats", 4096)])
def test_a_consumer_spinning_on_a_non_blocking_call_lets_other_threads_run(backend, call, capacity):
    """A consumer thread looping on poll_completions (or on try_dequeue_result) kept the GIL, so a
    thread that let go of it (a producer's launch on the GPU, the simulator's kernel thread when it
    slept) waited the interpreter's switch interval (5 ms) to get it back: ~2,400 msg/s with 0.2 ms
    leases on the H200.  The child sets that interval to 1,000 s, so without the calls giving way
    it hangs (the bound below fails it).  A ring of 64 slots makes the producer wait for free slots
    (it sleeps: it needs the GIL back too).  "stats": a loop waiting on ``stats().processed`` (it
    did not give way before the thirteenth session)."""
    child = Path(__file__).with_name("gil_child.py")
    try:
        r = subprocess.run(
            [sys.executable, str(child), backend, call, "20000" if backend == "cuda" else "2000", str(capacity)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the consumer never let the other threads run (> 120 s): {exc.stdout}{exc.stderr}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-2000:]


def test_looks_that_find_nothing_to_do_give_way(make_queue):
    """A loop on outstanding(), on free_slots() with the ring full or on take_results(timeout=0)
    with the result not done keeps the GIL as a loop on stats() did (the "stats" case above): each
    such look gives way (GpuQueue._give_way) as poll_completions does when it finds nothing."""
    q = make_queue(capacity=4, slot_bytes=16)
    q.pause()  # nothing is processed: the ring fills, no result comes
    ids = [q.enqueue(b"m%d" % i) for i in range(4)]
    calls = []
    q._give_way = lambda: calls.append(1)
    assert q.outstanding() == ids and len(calls) == 1
    assert q.free_slots() == 0 and len(calls) == 2
    with pytest.raises(ResultTimeout):
        q.take_results(ids[0], 1, timeout=0)
    assert len(calls) == 3
    q.stats()
    assert len(calls) == 4
    del q._give_way
    q.resume()
    assert [q.wait_result(m) for m in ids] == [b"m0", b"m1", b"m2", b"m3"]
    assert q.free_slots() == 4


@pytest.mark.parametrize(
    "payload",
    [bytearray(b"abc"), memoryview(b"abcdef")[1:4], np.arange(4, dtype=np.float32), np.zeros((2, 3), np.uint8)],
)
def test_buffer_protocol_payloads(make_queue, payload):
    q = make_queue(capacity=8, slot_bytes=64)
    assert q.wait_result(q.enqueue(payload)) == bytes(memoryview(payload).cast("B"))


def test_bad_input_is_refused_and_nothing_queued_is_lost(make_queue):
    q = make_queue(capacity=8, slot_bytes=32)
    ids = [q.enqueue(b"keep%d" % i) for i in range(3)]
    with pytest.raises(PayloadError, match="33 bytes; slot_bytes is 32"):
        q.enqueue(b"x" * 33)
    with pytest.raises(PayloadTypeError, match="str"):
        q.enqueue("text")
    with pytest.raises(TypeError):  # PayloadTypeError is a TypeError too
        q.enqueue(12345)
    with pytest.raises(PayloadTypeError, match="contiguous"):
        q.enqueue(np.arange(16, dtype=np.uint8)[::2])
    assert q.stats().enqueued == 3
    assert [q.wait_result(i) for i in ids] == [b"keep0", b"keep1", b"keep2"]
    assert q.wait_result(q.enqueue(b"x" * 32)) == b"x" * 32


def test_unknown_ids_give_none(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    assert q.try_dequeue_result(0) is None
    assert q.try_dequeue_result(10**9) is None
    with pytest.raises(KeyError):
        q.wait_result(5)


def test_shutdown_releases_a_producer_waiting_on_a_full_ring(make_queue):
    q = make_queue(capacity=2, slot_bytes=16, enqueue_timeout_s=math.inf)
    q.enqueue(b"a"), q.enqueue(b"b")
    outcome = []

    def producer():
        try:
            q.enqueue(b"c")
        except QueueClosed as exc:
            outcome.append(exc)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    q.shutdown()
    t.join(5)
    assert time.monotonic() - t0 < 2 and not t.is_alive() and len(outcome) == 1
    assert q.wait_result(0) == b"a" and q.wait_result(1) == b"b"  # drained, still takeable


def test_wait_result_without_timeout_and_bad_arguments(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    assert q.wait_result(q.enqueue(b"x"), timeout=None) == b"x"
    for bad in (1.5, "a", None):
        with pytest.raises(TypeError, match="msg_id must be an int"):
            q.try_dequeue_result(bad)
    with pytest.raises(ValueError, match="timeout=-1"):
        q.wait_result(0, timeout=-1)
    with pytest.raises(ValueError, match="max_items"):
        q.poll_completions(max_items=-1)
    for _ in range(8):
        q.enqueue(b"fill")
    with pytest.raises(ValueError, match="timeout='x'"):
        q.enqueue(b"x", timeout="x")


def test_shutdown_again_after_a_drain_timeout_waits_for_the_exit(make_queue, backend):
    q = make_queue(capacity=1024, slot_bytes=16)
    if backend == "sim":
        q._kernel.delay_s = 1e-3
    for _ in range(1000):
        q.enqueue(b"z")
    try:
        q.shutdown(timeout=0)  # too short to drain: the kernel is aborted and it says so
    except GpuqError as exc:
        assert "did not drain" in str(exc)
    q.shutdown()
    assert q.stats().kernel == "exited"


@pytest.mark.parametrize(
    "payload, expect",
    [
        (np.array([1, None], dtype=object), "object pointers"),
        (np.zeros(2, "datetime64[s]"), "bytes-like"),
    ],
)
def test_payloads_that_are_not_plain_data_are_refused(make_queue, payload, expect):
    q = make_queue(capacity=8, slot_bytes=64)
    with pytest.raises(PayloadTypeError, match=expect):
        q.enqueue(payload)
    assert q.wait_result(q.enqueue(np.zeros((0, 5)))) == b""  # an empty array is an empty payload


def test_a_lost_result_at_the_tail_is_named_and_listed(make_queue):
    """capacity 4: results 1-3 taken, 0 not: the ring is full because slots free in msg_id order.
    The error names msg_id 0 and what to do; outstanding() lists it."""
    q = make_queue(capacity=4, slot_bytes=16)
    ids = [q.enqueue(bytes([i])) for i in range(4)]
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        got += q.poll_completions()
    assert got == ids
    assert [q.try_dequeue_result(i) for i in ids[1:]] == [b"\x01", b"\x02", b"\x03"]
    with pytest.raises(QueueFull, match=r"frees when msg_id 0 is taken.*try_dequeue_result\(0\).*1 of 4 slots"):
        q.enqueue(b"x", timeout=0)
    assert q.outstanding() == [0] and q.stats().occupied == 1 and q.poll_completions() == []
    assert q.try_dequeue_result(0) == b"\x00"
    assert q.enqueue(b"x", timeout=0) == 4 and q.outstanding() == [4]


@pytest.mark.parametrize("bad", [-5, "abc", math.nan, True, -math.inf])
def test_a_bad_enqueue_timeout_is_refused_up_front(make_queue, bad):
    q = make_queue(capacity=8, slot_bytes=16)
    with pytest.raises(ConfigError, match="timeout"):
        q.enqueue(b"a", timeout=bad)
    assert q.stats().enqueued == 0
    assert q.wait_result(q.enqueue(b"a", timeout=np.float64(0.5))) == b"a"  # numpy numbers are numbers


def test_poll_max_items_takes_numpy_integers(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    ids = [q.enqueue(b"p") for _ in range(3)]
    assert q.wait_result(ids[2], timeout=10) == b"p"  # taken out of order; 0 and 1 are polled below
    seen = []
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        seen += q.poll_completions(np.int64(2))
    assert seen == ids[:2]
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="max_items"):
            q.poll_completions(bad)


def test_wait_result_errors_are_the_library_s_and_the_builtins(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    with pytest.raises(UnknownMessage) as exc:
        q.wait_result(99)
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, GpuqError)
    assert str(exc.value) == "msg_id 99 was already taken or never issued"  # no KeyError quotes
    with q.paused():
        mid = q.enqueue(b"x")
        with pytest.raises(ResultTimeout) as exc:
            q.wait_result(mid, timeout=0.01)
        assert isinstance(exc.value, TimeoutError) and isinstance(exc.value, GpuqError)
    assert q.wait_result(mid) == b"x"
    q.shutdown()
    with pytest.raises(QueueClosed):
        q.enqueue(b"late")


def test_msg_id_types(make_queue):
    """numpy integers are msg_ids; numpy's bool is not (np.True_ took msg_id 1), nor a 0-d array,
    a float or a str; ids never issued (negative, 2**64 and above) are None / UnknownMessage."""
    from gpuq_driver import UnknownMessage

    q = make_queue(capacity=8, slot_bytes=16)
    for i in range(3):
        q.enqueue(bytes([i]))
    assert q.wait_result(2, timeout=10) == b"\x02"
    for bad in (np.True_, np.False_, np.array(1), np.array([1]), 1.0, np.float32(1), "1", None):
        for call in (q.try_dequeue_result, q.wait_result):
            with pytest.raises(TypeError, match="msg_id must be an int, not"):
                call(bad)
    for never in (-1, 2**64, 2**64 + 1, np.int64(-7), np.uint64(2**64 - 1)):
        assert q.try_dequeue_result(never) is None
        with pytest.raises(UnknownMessage):
            q.wait_result(never, timeout=0)
    assert q.try_dequeue_result(np.uint64(0)) == b"\x00" and q.wait_result(np.int32(1)) == b"\x01"
    assert q.outstanding() == []


def test_closed_queue_as_context_manager_and_bool_msg_ids(make_queue):
    """Fresh trial: `with q:` on a closed queue went on silently; wait_result(True) took msg_id 1;
    wait_result's timeout error did not say that None is allowed."""
    from gpuq_driver import ConfigError, QueueClosed

    q = make_queue(capacity=8, slot_bytes=16)
    q.enqueue(b"a"), q.enqueue(b"b")
    for call in (q.wait_result, q.try_dequeue_result):
        with pytest.raises(TypeError, match="not bool"):
            call(True)
    with pytest.raises(ConfigError, match="or None"):
        q.wait_result(0, timeout=-1)
    assert q.wait_result(1) == b"b" and q.wait_result(0) == b"a"
    q.close()
    with pytest.raises(QueueClosed):
        with q:
            pass
