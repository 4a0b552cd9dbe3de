"""The kernel's lifecycle: leases, parking when idle, relaunch on demand, pause/resume, shutdown from
any state.  On the CPU simulator everywhere and on the persistent kernel where a GPU exists."""

from __future__ import annotations

import math
import sys
import threading
import time

import numpy as np
import pytest

from gpuq_driver import ConfigError, GpuqError, GpuQueue, QueueClosed, QueueConfig, QueueFull
from gpuq_driver.layout import KERNEL_PARKED, KERNEL_RUNNING, CtrlDev
from gpuq_driver.lease import Leases


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


def record_sleeps(monkeypatch, thread: threading.Thread | None = None) -> list[float]:
    """Patch time.sleep so that each call made by ``thread`` (default: the calling one) notes its
    seconds in the list returned; the sleeps still happen."""
    thread, real_sleep, slept = thread or threading.current_thread(), time.sleep, []

    def sleep(seconds):
        if threading.current_thread() is thread:
            slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return slept


def test_stats_never_reports_running_once_every_lease_has_ended():
    """A lease's last warp writes the kernel state, then leases_ended (end_lease, and the simulator
    the same), and stats() reads leases_ended first: so a snapshot that counts every launched lease
    as ended also sees the final state.  Here the lease ends between stats()'s two reads of the
    device's words (whichever comes first): the state machine test caught stats() saying "running"
    with every lease ended on the GPU (2 of 15 runs) while it read the state first."""
    q = GpuQueue(QueueConfig(capacity=16, slot_bytes=32, lease_ms=1.0, linger_ms=0, backend="sim"))
    try:
        assert q.wait_result(q.enqueue(b"x"), timeout=5) == b"x"
        assert wait_for(lambda: parked(q)), q.stats()
        real_ctrl, real_ended, launches = q._kernel.ctrl, q._leases.ended, q._leases.launches
        # the device mid-way through a lease's end: still RUNNING, not yet ended
        real_ctrl.state, real_ended[0] = KERNEL_RUNNING, launches - 1

        def end_the_lease():  # end_lease's order: state, then leases_ended
            real_ctrl.state, real_ended[0] = KERNEL_PARKED, launches

        class Ctrl:
            def __getattr__(self, name):
                return getattr(real_ctrl, name)

            @property
            def state(self):
                v = real_ctrl.state
                end_the_lease()
                return v

        class Ended:
            def __getitem__(self, i):
                v = real_ended[i]
                end_the_lease()
                return v

        q._kernel.ctrl, q._leases.ended = Ctrl(), Ended()
        try:
            s = q.stats()
        finally:
            q._kernel.ctrl, q._leases.ended = real_ctrl, real_ended
        assert not (s.kernel == "running" and s.exits == s.launches), s
        assert q.stats().kernel == "parked"
    finally:
        q.close()


def test_an_idle_queue_parks_and_the_next_message_relaunches(make_queue):
    q = make_queue(capacity=16, slot_bytes=32, lease_ms=1.0, linger_ms=0)
    assert q.wait_result(q.enqueue(b"first")) == b"first"
    assert wait_for(lambda: parked(q)), q.stats()  # within ~2 leases nothing runs any more
    before = q.stats()
    assert before.launches >= 1 and before.pending == 0
    time.sleep(0.02)
    assert q.stats().launches == before.launches  # idle: no launch at all
    assert q.wait_result(q.enqueue(b"after idle")) == b"after idle"
    s = q.stats()
    assert s.launches == before.launches + 1 and s.enqueued == s.processed == s.taken == 2


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
    q.pause()  # pauses nest: this one is counted in force, not as a new parking
    assert q.stats().pauses == 1
    q.resume()
    time.sleep(0.03)
    assert q.stats().kernel == "paused" and q.poll_completions() == []  # one pause is still in force
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
        with pytest.raises(TimeoutError, match="paused"):
            q.wait_result(mid, timeout=0.05)
        for _ in range(7):
            q.enqueue(b"fill")
        with pytest.raises(QueueFull, match="paused"):
            q.enqueue(b"no room", timeout=0.01)
    assert q.wait_result(mid) == b"later"


def test_paused_blocks_nest_across_threads(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    inner_done = threading.Event()

    def other():
        with q.paused():
            time.sleep(0.01)
        inner_done.set()

    with q.paused():
        t = threading.Thread(target=other)
        t.start()
        mid = q.enqueue(b"x")
        assert inner_done.wait(5)
        time.sleep(0.03)
        assert q.try_dequeue_result(mid) is None and q.stats().kernel == "paused"  # ours still holds
    t.join()
    assert q.wait_result(mid) == b"x"


def test_a_pause_that_times_out_leaves_nothing_paused():
    q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend="sim", lease_ms=1.0))
    q._kernel.delay_s = 0.2  # the simulated lease is inside a slow message: it cannot leave in time
    first = q.enqueue(b"slow")
    time.sleep(0.02)
    with pytest.raises(GpuqError, match="did not leave"):
        with q.paused(timeout=0.001):
            pass
    assert not q._leases.paused
    q._kernel.delay_s = 0
    assert q.wait_result(first, timeout=5) == b"slow" and q.wait_result(q.enqueue(b"b"), timeout=5) == b"b"
    q.close()


def test_pause_cannot_stop_a_drain(make_queue, backend):
    q = make_queue(capacity=64, slot_bytes=16)
    if backend == "sim":
        q._kernel.delay_s = 5e-3
    ids = [q.enqueue(bytes([i])) for i in range(30)]
    t = threading.Thread(target=lambda: q.shutdown(drain=True, timeout=10))
    t.start()
    time.sleep(0.02)
    try:
        q.pause(timeout=5)  # refused once shutdown has begun, or overtaken by it
    except QueueClosed:
        pass
    t.join(20)
    assert not t.is_alive()
    assert [q.try_dequeue_result(i) for i in ids] == [bytes([i]) for i in range(30)]
    with pytest.raises(QueueClosed):
        q.pause()


def test_pause_needs_leases(make_queue):
    q = make_queue(capacity=8, slot_bytes=16, lease_ms=math.inf)
    with pytest.raises(ConfigError, match="lease_ms=inf"):
        q.pause()
    assert q.wait_result(q.enqueue(b"x")) == b"x"


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
    q = make_queue(capacity=8, slot_bytes=16, lease_ms=0.5, linger_ms=0)
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


def test_a_lingering_kernel_keeps_serving_then_parks(make_queue):
    """After the last message the keeper keeps leases coming for linger_ms, then lets the kernel park.

    One snapshot can fall in a gap between two leases: a keeper descheduled for longer than a
    lease (a loaded machine) finds every lease it launched ended, the state "parked", and
    launches the next one at its next look (1 of 12 runs under four busy processes on 2 CPUs).
    So "still running" is a lease seen within 50 ms of the snapshot, well inside linger_ms."""
    q = make_queue(capacity=16, slot_bytes=32, lease_ms=1.0, linger_ms=400)
    assert q.wait_result(q.enqueue(b"x")) == b"x"
    before = q.stats().launches
    time.sleep(0.1)
    s = q.stats()
    assert s.launches >= before + 5, s  # a lease per ~1 ms, from the keeper
    assert s.launches - s.exits <= 2
    assert s.kernel == "running" or wait_for(lambda: q.stats().kernel == "running", timeout=0.05), s
    assert wait_for(lambda: parked(q), timeout=10), q.stats()
    assert q.wait_result(q.enqueue(b"y")) == b"y"


def test_a_message_after_a_short_pause_makes_no_cuda_call_in_the_producer(make_queue):
    """While the kernel lingers the keeper queues every lease; the producer launches none.

    The producer launches by design once the keeper has fallen behind (lease.Leases.after_publish:
    its freshness mark, ``fresh_until``, is 2 looks old), and a keeper falls behind whenever it gets
    no CPU for a millisecond: kept from the GIL by other threads of the test process (the
    simulator's, those left by earlier tests), for up to the 5 ms switch interval, made short here,
    or descheduled by the OS on a loaded machine, which no interval helps (under two busy processes
    on 2 CPUs 4 of 10 runs saw 2-3 of 20).  So each launch by the producer is checked against the
    keeper's looks, timed here: it is the rule's only if the keeper's last finished look had begun
    less than 2 periods before it (the keeper was keeping up), and at most one such may happen."""
    q = make_queue(capacity=16, slot_bytes=32, lease_ms=1.0, linger_ms=1000)
    kernel, leases, launches_by = q._kernel, q._leases, []
    launch, kick, after_publish, wake = kernel.launch, leases.kick, leases.after_publish, leases._wake
    main = threading.current_thread().name
    waits = []  # the keeper's waits, (entered, returned): a look runs from one's return to the next's entry
    producer_launches = []  # (before the producer applied its rule, after it launched)
    ruling = []  # when after_publish began (it reads the clock there, then kicks)

    def counted():
        launches_by.append(threading.current_thread().name)
        launch()

    class KeeperWake:
        def wait(self, timeout):
            entered = time.monotonic()
            woken = wake.wait(timeout)
            waits.append((entered, time.monotonic()))
            return woken

        def set(self):
            wake.set()

        def clear(self):
            wake.clear()

    def timed_after_publish():
        ruling.append(time.monotonic())
        try:
            return after_publish()
        finally:
            ruling.pop()

    def timed_kick(ahead=True, second=False):  # Leases.kick's signature (after_publish passes both)
        if threading.current_thread().name != main:
            return kick(ahead, second)
        before = ruling[-1] if ruling else time.monotonic()
        launched = kick(ahead, second)
        if launched:
            producer_launches.append((before, time.monotonic()))
        return launched

    def keeper_behind(before, after) -> bool:
        """The keeper had not begun a look, finished before ``before``, within 2 periods of ``after``."""
        begun = [r for (_, r), (e, _) in zip(waits, waits[1:]) if e <= before]
        return not begun or after - begun[-1] > 2 * leases._period

    kernel.launch, leases._wake, leases.after_publish, leases.kick = (
        counted,
        KeeperWake(),
        timed_after_publish,
        timed_kick,
    )
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        for i in range(20):
            time.sleep(0.02)  # a pause in traffic, shorter than linger_ms
            assert q.wait_result(q.enqueue(bytes([i]))) == bytes([i])
    finally:
        sys.setswitchinterval(interval)
    by_main = launches_by.count(main)
    assert by_main == len(producer_launches)  # every launch by the producer went through Leases.kick
    by_rule = [launch for launch in producer_launches if not keeper_behind(*launch)]
    assert len(by_rule) <= 1, (
        f"{len(by_rule)} of 20 messages launched a lease from the producer while the keeper kept up "
        f"({by_main} in all, {launches_by.count('gpuq-lease-keeper')} by the keeper)"
    )
    assert launches_by.count("gpuq-lease-keeper") >= 20 * 20 // 2  # ~a lease per ms, all from the keeper


class _FakeKernel:
    """Just the device-written line and a launch counter: enough to drive Leases by hand."""

    def __init__(self):
        from gpuq_driver.layout import HostLayout

        self.layout = HostLayout(2, 16, 1)
        self.mem = memoryview(bytearray(self.layout.nbytes))
        self.ctrl = CtrlDev.from_buffer(self.mem, self.layout.offsets["ctrl_dev"])
        self.launched = 0

    def launch(self):
        self.launched += 1


def test_the_producer_launches_only_when_no_lease_will_read_the_doorbell():
    """Leases' launch rule, with the device counters set by hand (lease.py, gpuq_layout.cuh)."""
    k = _FakeKernel()
    leases = Leases(k, lease_ms=1.0, linger_ms=100.0)
    assert leases.kick() and k.launched == 1  # the first lease
    assert not leases.kick(ahead=False)  # lease 1 not begun: it will read the doorbell
    k.ctrl.leases_begun = 1
    leases.fresh_until = time.monotonic() + 60  # a keeper that keeps up
    assert not leases.after_publish() and k.launched == 1  # lease 1 runs, not leaving: its last read is to come
    k.ctrl.leases_leaving = 1
    assert leases.after_publish() and k.launched == 2  # lease 1 is leaving: the producer launches lease 2
    assert not leases.after_publish()  # lease 2 not begun
    k.ctrl.leases_begun = 2
    leases.fresh_until = 0.0  # the keeper fell behind (or is not keeping)
    assert leases.after_publish() and k.launched == 3  # so the producer queues the successor itself
    k.ctrl.leases_begun = k.ctrl.leases_leaving = k.ctrl.leases_ended = 3
    leases._depth = 1  # paused: nobody launches
    assert not leases.after_publish() and not leases.kick() and k.launched == 3


def test_the_producer_queues_a_second_lease_during_a_hand_over():
    """While messages flow, a producer that finds the running lease leaving (its successor queued,
    not begun) queues the next one at once, so that the launch falls in the round trip that waits
    for the hand-over anyway; before, the first enqueue after the successor began launched, and
    ~1.2 % of 64 B round trips at 1 ms leases paid for one or the other (probe_tail.py, twelfth
    session: the launch now falls in the round trip that met the hand-over in 0.58-1.00 % of round
    trips, that is in every one)."""
    k = _FakeKernel()
    leases = Leases(k, lease_ms=1.0, linger_ms=100.0)
    assert leases.kick() and k.launched == 1  # the first lease
    k.ctrl.leases_begun = 1
    assert leases.after_publish() and k.launched == 2  # flowing: lease 2 queued behind the running lease 1
    assert not leases.after_publish() and k.launched == 2  # lease 1 runs, lease 2 waits
    k.ctrl.leases_leaving = 1  # lease 1's time is up: lease 2 takes over next
    assert leases.after_publish() and k.launched == 3  # lease 3 queued now, during the hand-over
    assert not leases.after_publish() and k.launched == 3  # two wait: no third
    k.ctrl.leases_ended, k.ctrl.leases_begun = 1, 2
    assert not leases.after_publish() and k.launched == 3  # lease 2 runs, lease 3 waits
    leases.second = False  # the rule before: wait until lease 3 has begun
    k.ctrl.leases_leaving = 2
    assert not leases.after_publish() and k.launched == 3
    k.ctrl.leases_ended, k.ctrl.leases_begun = 2, 3
    assert leases.after_publish() and k.launched == 4
    leases.second = True
    leases.fresh_until = time.monotonic() + 60  # a keeper that keeps up queues successors itself
    k.ctrl.leases_leaving = 3
    assert not leases.after_publish() and k.launched == 4  # lingering: no second lease
    never = Leases(_FakeKernel(), lease_ms=math.inf)  # a kernel that never leaves needs no successor
    assert never.kick() and never._kernel.launched == 1
    never._kernel.ctrl.leases_begun = never._kernel.ctrl.leases_leaving = 1
    assert not never.after_publish() and never._kernel.launched == 1


def test_lease_config():
    assert QueueConfig().lease_ms == 1.0 and QueueConfig().lease_ns == 1_000_000
    assert QueueConfig(lease_ms=math.inf).lease_ns == (1 << 64) - 1
    for bad in (0, 0.01, -1, "1", None, True, math.nan, 1e300, 2**64, 10**400, 3_600_001):
        with pytest.raises(ConfigError, match="lease_ms"):
            QueueConfig(lease_ms=bad)
    assert (
        QueueConfig(lease_ms=np.float32(0.5)).lease_ns == 500_000 and QueueConfig(lease_ms=np.int64(2)).lease_ms == 2.0
    )
    assert QueueConfig().linger_ms == 100.0 and QueueConfig(linger_ms=0).linger_ms == 0.0
    assert QueueConfig(linger_ms=math.inf).linger_ms == math.inf
    for bad in (-1, "1", None, True, math.nan, 3_600_001):
        with pytest.raises(ConfigError, match="linger_ms"):
            QueueConfig(linger_ms=bad)


def test_a_queue_that_never_leaves(make_queue):
    q = make_queue(capacity=8, slot_bytes=16, lease_ms=math.inf)
    assert q.wait_result(q.enqueue(b"x")) == b"x"
    time.sleep(0.02)
    s = q.stats()
    assert s.kernel == "running" and s.launches == 1 and s.exits == 0


def test_enqueues_into_a_queue_that_never_leaves_skip_the_launch_rule(make_queue):
    """No successor is ever queued behind a lease that never leaves, so no enqueue (nor batch) need
    apply the launch rule (Leases.after_publish): until the thirteenth session each one did
    (leases_leaving 0 >= launches 1 - 1), ~0.3 µs an enqueue; one thread's enqueue rate was 869,446
    msg/s never leaving against 1,229,897 with 1 ms leases (benchmarks/NOTES.md)."""
    q = make_queue(capacity=64, slot_bytes=16, lease_ms=math.inf)
    calls = []
    after_publish = q._leases.after_publish
    q._leases.after_publish = lambda: calls.append(1) or after_publish()
    ids = [q.enqueue(b"m%d" % i) for i in range(20)]
    first = q.enqueue_many([b"a", b"b"])
    assert [q.wait_result(m) for m in ids] == [b"m%d" % i for i in range(20)]
    assert [q.wait_result(first), q.wait_result(first + 1)] == [b"a", b"b"]
    assert calls == []
    s = q.stats()
    assert s.launches == 1 and s.kernel == "running"


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


def test_a_producer_waiting_on_untaken_results_launches_nothing(make_queue):
    """A ring full of results nobody took: nothing is pending for the kernel, so a producer that
    waits for a slot must not keep launching leases (the GPU would never be left alone)."""
    q = make_queue(capacity=8, slot_bytes=16, linger_ms=0)
    for _ in range(8):
        q.enqueue(b"x")
    assert wait_for(lambda: q.stats().processed == 8) and wait_for(lambda: parked(q))
    launches = q.stats().launches
    with pytest.raises(QueueFull):
        q.enqueue(b"y", timeout=0.2)
    assert q.poll_completions(0) == []
    assert q.stats().launches == launches


def test_huge_timeouts_are_config_errors(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    for call in (
        lambda: q.wait_result(0, timeout=10**400),
        lambda: q.pause(timeout=10**400),
        lambda: q.enqueue(b"x", timeout=10**400),
        lambda: q.shutdown(timeout=10**400),
    ):
        with pytest.raises(ConfigError, match="timeout"):
            call()
    with pytest.raises(ConfigError, match="enqueue_timeout_s"):
        QueueConfig(enqueue_timeout_s=10**400)
    assert q.stats().enqueued == 0 and q.wait_result(q.enqueue(b"ok")) == b"ok"


def test_a_pause_overtaken_by_shutdown_raises():
    q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend="sim"))
    q._kernel.delay_s = 0.3  # a slow message keeps the lease from leaving
    q.enqueue(b"a")
    time.sleep(0.02)
    threading.Timer(0.05, lambda: q.shutdown(drain=False)).start()
    with pytest.raises(QueueClosed, match="shut down while pause"):
        q.pause(timeout=5)
    q.close()


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupted_launch_does_not_jam_the_queue(make_queue, when):
    """A KeyboardInterrupt in a launch (Ctrl-C while a producer relaunches a parked queue) used to
    undo the launch count whatever had happened: interrupted after the driver queued the lease,
    the count stayed one behind the device's, so nobody launched again, messages waited for good
    and close() timed out.  Interrupted before, the lease is not queued: counted as launched
    until the stream is idle, it must not be waited for as "not begun yet" either."""
    q = make_queue(capacity=16, slot_bytes=16, linger_ms=0.0)
    assert q.wait_result(q.enqueue(b"warm"), 10) == b"warm"
    deadline = time.monotonic() + 10
    while q.stats().kernel != "parked":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    kernel, launch = q._kernel, q._kernel.launch

    def interrupted_launch():
        kernel.launch = launch  # once
        if when == "after":
            launch()
        raise KeyboardInterrupt

    kernel.launch = interrupted_launch
    with pytest.raises(KeyboardInterrupt):
        q.enqueue(b"first")  # published, then the producer launches (interrupted)
    assert q.wait_result(1, 10) == b"first"
    leases = q._leases
    deadline = time.monotonic() + 10
    while leases.ended[0] != leases.begun[0] or not q._kernel.idle():  # the device's own counts: parked
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert q.wait_result(q.enqueue(b"next"), 10) == b"next"
    started = time.monotonic()
    q.close()
    assert time.monotonic() - started < 5


def test_empty_consumer_calls_give_way_while_a_launch_is_in_flight(make_queue, monkeypatch):
    """A launch lets go of the GIL in the driver call; a consumer spinning on empty calls kept it
    for CPython's switch interval, so each lease's launch held its producer 5-30 ms (~2,400 msg/s
    on the H200 with 0.2 ms leases).  While a launch is in flight (Leases.launching), an empty
    poll_completions or a try_dequeue_result that finds nothing sleeps(0); with no launch in
    flight a thread spinning alone sleeps at most once per look of the lease keeper
    (when it is due back from its wait: Leases.wake_at), not on every 8th empty call."""
    q = make_queue(capacity=16, slot_bytes=16, linger_ms=0.0)
    assert q.wait_result(q.enqueue(b"warm"), 10) == b"warm"
    assert wait_for(lambda: parked(q), 10), q.stats()
    slept = record_sleeps(monkeypatch)
    kernel, launch, looks = q._kernel, q._kernel.launch, []

    def launch_with_looks():  # another consumer's empty looks, as if made while the driver call runs
        kernel.launch = launch
        before = len(slept)
        assert q.poll_completions() == [] and q.try_dequeue_result(1000) is None
        looks.append((q._leases.launching, slept[before:]))
        launch()

    kernel.launch = launch_with_looks
    mid = q.enqueue(b"relaunch")  # parked: this enqueue launches
    assert looks == [(True, [0, 0])]  # both looks gave way, once each
    assert q.wait_result(mid, 10) == b"relaunch" and not q._leases.launching
    slept.clear()
    for _ in range(100):
        assert q.try_dequeue_result(1000) is None
    # the keeper waits >= 0.5 ms between looks and 100 calls take ~0.1 ms, so at most one look falls
    # among them; it may take a few sleeps (the simulator's kernel thread can take the GIL before the
    # keeper does: 1 run in 40 on a loaded 2-CPU machine), never the old one in every 8 calls (12)
    assert len(slept) <= 3, slept


def test_empty_consumer_calls_give_way_while_the_keeper_is_in_a_driver_call(make_queue, monkeypatch):
    """The keeper's look asks the driver too (the watchdog's cuStreamQuery once nothing moved),
    which lets go of the GIL.  It used to mark itself as wanting the GIL only while waiting between
    looks, so a consumer spinning on try_dequeue_result kept the GIL for the switch interval, and
    with no launch left to give way to it hung (H200, eleventh session: gil_child.py "take", 20,000
    messages, 0.2 ms leases, past 120 s).  A lease that never ends makes the watchdog look at the
    stream on every look once the queue is quiet."""
    q = make_queue(capacity=16, slot_bytes=16, lease_ms=math.inf)
    assert q.wait_result(q.enqueue(b"warm"), 10) == b"warm"
    keeper = q._leases._thread
    slept = record_sleeps(monkeypatch, keeper)
    kernel, idle, looks = q._kernel, q._kernel.idle, []

    def idle_with_looks():  # a consumer's empty look, as if made while the driver call runs
        if threading.current_thread() is keeper and not looks:
            before = len(slept)
            assert q.try_dequeue_result(1000) is None
            looks.append(slept[before:])
        return idle()

    monkeypatch.setattr(kernel, "idle", idle_with_looks)
    assert wait_for(lambda: looks, 10), "the keeper never asked the stream"
    assert looks == [[0]]  # it gave way, once


@pytest.mark.parametrize("call", ["enqueue_many", "enqueue_device"])
def test_empty_consumer_calls_give_way_while_a_producer_copies_a_batch(call, monkeypatch):
    """NumPy lets go of the GIL for copies of 512 items or more, and enqueue_device's copies are
    driver calls: a batch producer beside a consumer spinning on empty calls waited for the keeper's
    next look (up to 20 ms) on each batch (a review, eleventh session: enqueue_many of 1 MiB took
    1-62 ms beside a spinning consumer, 14-170 µs alone).  While a producer copies a batch, an empty
    call sleeps(0); outside it, none does."""
    with GpuQueue(QueueConfig(backend="sim", capacity=16, slot_bytes=64)) as q:
        slept, looks = record_sleeps(monkeypatch), []
        publish = q._publish_locked

        def publish_with_looks(*args):  # a consumer's empty looks, as if made while the copies run
            before = len(slept)
            assert q.try_dequeue_result(1000) is None and q.take_ready()[2].size == 0
            looks.append(slept[before:])
            publish(*args)

        monkeypatch.setattr(q, "_publish_locked", publish_with_looks)
        batch = np.arange(4 * 64, dtype=np.uint8).reshape(4, 64)
        first = getattr(q, call)(batch)
        assert looks == [[0, 0]]  # both looks gave way, once each
        assert [q.wait_result(first + i, 10) for i in range(4)] == [bytes(row) for row in batch]
        monkeypatch.setattr(q._leases, "wake_at", math.inf)  # the keeper's looks aside
        slept.clear()
        for _ in range(100):
            assert q.try_dequeue_result(1000) is None
        assert slept == []


def test_a_keeper_that_ended_leaves_no_give_way_behind(make_queue, monkeypatch):
    """The keeper ends if its own launch fails without a fault (Leases.error).  A producer's later
    launch, finding the keeper marked parked, set wake_at = 0.0 to wake it, and with no keeper left
    to reset it every empty try_dequeue_result slept(0) from then on (~60 µs a call; a review,
    eleventh session).  Now the launch sees that the keeper has ended."""
    q = make_queue(capacity=16, slot_bytes=16, linger_ms=0.0)
    assert q.wait_result(q.enqueue(b"warm"), 10) == b"warm"
    leases, kernel = q._leases, q._kernel
    assert wait_for(lambda: leases._keeper_parked and not leases.serving(), 10)
    keeper, launch = leases._thread, kernel.launch

    def refused_for_the_keeper():
        if threading.current_thread() is keeper:
            raise RuntimeError("launch refused (the context is fine)")
        launch()

    monkeypatch.setattr(kernel, "launch", refused_for_the_keeper)
    monkeypatch.setattr(leases, "after_publish", lambda: False)  # the keeper rescues this one
    first = q.enqueue(b"one")
    assert wait_for(lambda: not keeper.is_alive(), 10) and isinstance(leases.error, RuntimeError)
    monkeypatch.undo()
    second = q.enqueue(b"two")  # this producer launches: the keeper was parked
    assert leases.launches >= 2 and leases.wake_at == math.inf
    got = {}  # by try_dequeue_result: wait_result raises KernelStopped once the keeper's launch failed

    def taken():
        for m in (first, second):
            if got.get(m) is None:
                got[m] = q.try_dequeue_result(m)
        return got == {first: b"one", second: b"two"}

    assert wait_for(taken, 10), got
    slept = record_sleeps(monkeypatch)
    for _ in range(100):
        assert q.try_dequeue_result(1000) is None
    assert slept == []
