"""The kernel's lifecycle: leases, parking when idle, relaunch on demand, pause/resume, shutdown from
any state.  On the CPU simulator everywhere and on the persistent kernel where a GPU exists."""

from __future__ import annotations

import math
import threading
import time

import pytest

from gpuq_driver import ConfigError, QueueClosed, QueueConfig, QueueFull


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-3)
    return True


def parked(q) -> bool:
    """Parked, and still so 20 ms later with nothing launched meanwhile (not a gap between leases)."""
    s = q.stats()
    if s.kernel != "parked" or s.exits != s.launches:
        return False
    time.sleep(0.02)
    return q.stats().launches == s.launches


def test_an_idle_queue_parks_and_the_next_message_relaunches(make_queue):
    q = make_queue(capacity=16, slot_bytes=32, lease_ms=1.0, park_after_ms=0)
    assert q.wait_result(q.enqueue(b"first")) == b"first"
    assert wait_for(lambda: parked(q)), q.stats()  # within ~2 leases nothing runs any more
    before = q.stats()
    assert before.launches >= 1 and before.pending == 0
    time.sleep(0.02)
    assert q.stats().launches == before.launches  # idle: no launch at all
    assert q.wait_result(q.enqueue(b"after idle")) == b"after idle"
    s = q.stats()
    assert s.launches == before.launches + 1 and s.enqueued == s.processed == s.taken == 2


def test_the_kernel_lingers_after_the_last_message_then_parks(make_queue):
    q = make_queue(capacity=16, slot_bytes=32, lease_ms=1.0, park_after_ms=300)
    assert q.wait_result(q.enqueue(b"x")) == b"x"
    t0 = time.monotonic()
    time.sleep(0.1)
    s = q.stats()
    if time.monotonic() - t0 < 0.25:  # still inside park_after_ms (a slow host may overshoot)
        assert s.kernel == "running" and s.launches >= 3, s  # lease after lease, launched by the keeper
    assert wait_for(lambda: parked(q)), q.stats()
    assert time.monotonic() - t0 >= 0.2
    launches = q.stats().launches
    time.sleep(0.05)
    assert q.stats().launches == launches  # parked: nothing launched any more
    assert q.wait_result(q.enqueue(b"y")) == b"y"


def test_leases_under_traffic_lose_and_duplicate_nothing(make_queue, backend):
    """Many leases end mid-traffic; every msg_id comes back once, in order, with its payload."""
    count = 200_000 if backend == "cuda" else 4_000
    q = make_queue(capacity=256, slot_bytes=32, lease_ms=0.2 if backend == "cuda" else 1.0)
    sent: dict[int, bytes] = {}
    got: dict[int, bytes] = {}

    def consumer():
        while len(got) < count:
            for mid in q.poll_completions():
                assert mid not in got
                got[mid] = q.try_dequeue_result(mid)

    c = threading.Thread(target=consumer)
    c.start()
    for i in range(count):
        p = i.to_bytes(4, "little") * (1 + i % 8)
        sent[q.enqueue(p, timeout=10)] = p
    c.join(120)
    assert not c.is_alive()
    assert sorted(sent) == list(range(count))  # msg_ids consecutive across leases
    assert got == sent
    s = q.stats()
    assert s.launches > 3, f"the test should span several leases: {s}"
    assert s.processed == s.taken == count and 0 <= s.launches - s.exits <= 2


def test_pause_parks_the_kernel_and_resume_serves_what_waited(make_queue):
    q = make_queue(capacity=64, slot_bytes=16)
    assert q.wait_result(q.enqueue(b"a")) == b"a"
    q.pause()
    s = q.stats()
    assert s.kernel == "paused" and s.exits == s.launches and s.pauses == 1
    ids = [q.enqueue(bytes([i])) for i in range(10)]  # accepted, not served
    time.sleep(0.03)
    assert q.poll_completions() == [] and q.try_dequeue_result(ids[0]) is None
    assert q.stats().processed == 1 and q.stats().launches == s.launches
    q.pause()  # twice is fine, counted once
    assert q.stats().pauses == 1
    q.resume()
    assert [q.wait_result(i) for i in ids] == [bytes([i]) for i in range(10)]
    q.resume()  # not paused: nothing happens
    with q.paused():
        assert q.stats().kernel == "paused"
        mid = q.enqueue(b"inside")
    assert q.wait_result(mid) == b"inside" and q.stats().pauses == 2


def test_wait_result_while_paused_times_out_and_keeps_the_result(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    with q.paused():
        mid = q.enqueue(b"later")
        with pytest.raises(TimeoutError):
            q.wait_result(mid, timeout=0.05)
    assert q.wait_result(mid) == b"later"


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_of_a_paused_queue(make_queue, drain):
    q = make_queue(capacity=64, slot_bytes=16)
    q.pause()
    ids = [q.enqueue(bytes([i])) for i in range(20)]
    q.shutdown(drain=drain)
    s = q.stats()
    assert s.kernel == "exited"
    if drain:
        assert s.processed == 20 and [q.try_dequeue_result(i) for i in ids] == [bytes([i]) for i in range(20)]
    else:
        assert s.processed == 0  # parked since before they came: an abort hands out no new message


def test_shutdown_of_a_parked_queue(make_queue):
    q = make_queue(capacity=8, slot_bytes=16, lease_ms=0.5, park_after_ms=0)
    q.wait_result(q.enqueue(b"x"))
    assert wait_for(lambda: parked(q))
    q.shutdown()
    assert q.stats().kernel == "exited"
    with pytest.raises(QueueClosed):
        q.enqueue(b"y")


def test_pause_and_resume_after_close_raise(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    q.close()
    with pytest.raises(QueueClosed):
        q.pause()
    with pytest.raises(QueueClosed):
        q.resume()


def test_a_producer_and_a_pauser_thread(make_queue, backend):
    """pause/resume from another thread at random moments while a producer and consumer run."""
    count = 50_000 if backend == "cuda" else 2_000
    q = make_queue(capacity=128, slot_bytes=16)
    got: dict[int, bytes] = {}
    done = threading.Event()

    def pauser():
        while not done.is_set():
            with q.paused():
                time.sleep(1e-3)
            time.sleep(2e-3)

    t = threading.Thread(target=pauser)
    t.start()
    try:
        sent = {}
        for i in range(count):
            p = i.to_bytes(4, "little")
            while True:
                try:
                    sent[q.enqueue(p, timeout=0)] = p
                    break
                except QueueFull:  # this thread is the consumer too: take, then try again
                    for mid in q.poll_completions():
                        got[mid] = q.try_dequeue_result(mid)
        for mid in sent.keys() - got.keys():
            got[mid] = q.wait_result(mid, timeout=10)
    finally:
        done.set()
        t.join(10)
    assert got == sent and q.stats().pauses > 0


def test_lease_config():
    assert QueueConfig().lease_ms == 1.0 and QueueConfig().lease_ns == 1_000_000
    assert QueueConfig(lease_ms=math.inf).lease_ns == (1 << 64) - 1
    for bad in (0, 0.01, -1, "1", None, True, math.nan):
        with pytest.raises(ConfigError, match="lease_ms"):
            QueueConfig(lease_ms=bad)
    assert QueueConfig().park_after_ms == 10.0 and QueueConfig(park_after_ms=0).park_after_ms == 0
    for bad in (-1, "1", None, True, math.nan):
        with pytest.raises(ConfigError, match="park_after_ms"):
            QueueConfig(park_after_ms=bad)


def test_a_queue_that_never_leaves(make_queue):
    q = make_queue(capacity=8, slot_bytes=16, lease_ms=math.inf)
    assert q.wait_result(q.enqueue(b"x")) == b"x"
    time.sleep(0.02)
    s = q.stats()
    assert s.kernel == "running" and s.launches == 1 and s.exits == 0


def test_a_dropped_queue_is_collected_and_its_kernel_closed(backend):
    import gc
    import weakref

    from gpuq_driver import GpuQueue

    q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend=backend))
    assert q.wait_result(q.enqueue(b"x")) == b"x"
    kernel, ref = q._kernel, weakref.ref(q)
    del q
    gc.collect()
    assert ref() is None, "something (the lease keeper?) still holds the queue"
    assert wait_for(lambda: kernel.closed), "the finalizer did not close the kernel"
