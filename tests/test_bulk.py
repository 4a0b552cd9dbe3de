"""GpuQueue's batch calls (gpuq_driver/bulk.py): enqueue_many, reserve/commit, take_results,
view_results, take_ready, free_slots; on the CPU simulator everywhere and on the persistent kernel
where a GPU exists.  Every result is checked byte for byte."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpuq_driver import (
    ConfigError,
    GpuqError,
    KernelStopped,
    PayloadError,
    PayloadTypeError,
    ProtocolError,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
)
from gpuq_driver.batch import FAILED
from gpuq_driver.bulk import Reservation, ResultView

RNG = np.random.default_rng(20261201)


def rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


def packed(lens, seed: int = 0) -> tuple[bytes, np.ndarray]:
    lens = np.asarray(lens, np.uint32)
    return np.random.default_rng(seed).integers(0, 256, int(lens.sum()), dtype=np.uint8).tobytes(), lens


def split(buf: bytes, lens) -> list[bytes]:
    out, pos = [], 0
    for m in np.asarray(lens).tolist():
        out.append(buf[pos : pos + m])
        pos += m
    return out


def results_as_bytes(data: np.ndarray, lens: np.ndarray) -> list[bytes]:
    return [bytes(data[i, :m]) for i, m in enumerate(lens.tolist())]


# --- enqueue_many ---------------------------------------------------------------------------------


def test_enqueue_many_rows_returns_the_first_msg_id_and_results_match(make_queue):
    q = make_queue(capacity=64, slot_bytes=64)
    assert q.enqueue(b"single") == 0
    a = rows(20, 48, seed=1)
    first = q.enqueue_many(a)
    assert first == 1 and q.stats().enqueued == 21
    assert q.wait_result(0, 10) == b"single"
    data, lens = q.take_results(first, 20, timeout=10)
    assert data.shape == (20, 64) and data.dtype == np.uint8 and lens.dtype == np.uint32
    assert (lens == 48).all() and (data[:, :48] == a).all()
    assert q.enqueue(b"after") == 21 and q.wait_result(21, 10) == b"after"
    s = q.stats()
    assert s.enqueued == s.processed == s.taken == 22 and s.occupied == 0


def test_enqueue_many_packed_variable_lengths_and_the_other_forms(make_queue):
    sb = 64
    q = make_queue(capacity=64, slot_bytes=sb)
    buf, lens = packed([0, 1, 15, 16, 17, 63, 64, 5, 0, 33], seed=2)
    first = q.enqueue_many(buf, lens)
    data, got = q.take_results(first, len(lens), timeout=10)
    assert results_as_bytes(data, got) == split(buf, lens)
    # equal lengths through the packed form (the 2-D fast path)
    buf, lens = packed([32] * 9, seed=3)
    first = q.enqueue_many(memoryview(buf), lens.tolist())
    assert results_as_bytes(*q.take_results(first, 9, timeout=10)) == split(buf, lens)
    # rows with lengths: message i is the first lengths[i] bytes of row i
    a = rows(5, 40, seed=4)
    ln = np.array([40, 0, 7, 39, 1])
    first = q.enqueue_many(a, ln)
    assert results_as_bytes(*q.take_results(first, 5, timeout=10)) == [bytes(a[i, :m]) for i, m in enumerate(ln)]
    # a list of messages
    msgs = [b"a", b"", bytearray(b"xyz" * 10), np.arange(4, dtype=np.uint32)]
    first = q.enqueue_many(msgs)
    assert results_as_bytes(*q.take_results(first, 4, timeout=10)) == [bytes(memoryview(m).cast("B")) for m in msgs]
    # long variable messages (the per-message copy path) in big slots
    q2_lens = [3000, 1, 4096, 2049]
    q.close()  # one persistent queue kernel per device per process
    big = make_queue(capacity=8, slot_bytes=4096)
    buf, lens = packed(q2_lens, seed=5)
    first = big.enqueue_many(buf, lens)
    assert results_as_bytes(*big.take_results(first, 4, timeout=10)) == split(buf, lens)


def test_enqueue_many_wraps_at_the_ring_end(make_queue):
    q = make_queue(capacity=8, slot_bytes=32)
    for lap in range(6):  # heads 0, 5, 10, ...: most batches wrap
        a = rows(5, 32, seed=lap)
        first = q.enqueue_many(a)
        assert first == 5 * lap
        data, lens = q.take_results(first, 5, timeout=10)
        assert (data == a).all() and (lens == 32).all()
    buf, lens = packed([1, 30, 0, 32, 9, 4, 17, 3], seed=9)  # a full ring of variable sizes, wrapping
    first = q.enqueue_many(buf, lens)
    assert first % 8 == 6
    assert results_as_bytes(*q.take_results(first, 8, timeout=10)) == split(buf, lens)


def test_bad_batches_are_refused_whole_and_nothing_queued_is_lost(make_queue):
    q = make_queue(capacity=8, slot_bytes=32)
    keep = [q.enqueue(b"keep%d" % i) for i in range(3)]
    cases = [
        (lambda: q.enqueue_many(rows(2, 33)), PayloadError, "rows are 33 bytes; slot_bytes is 32"),
        (lambda: q.enqueue_many(np.zeros((2, 4), np.uint16)), PayloadTypeError, "dtype uint8"),
        (lambda: q.enqueue_many(np.zeros((2, 2, 2), np.uint8)), PayloadTypeError, "2-D"),
        (lambda: q.enqueue_many(b"abc"), PayloadTypeError, "lengths="),
        (lambda: q.enqueue_many("text"), PayloadTypeError, "str"),
        (lambda: q.enqueue_many(12345), PayloadTypeError, "2-D uint8"),
        (lambda: q.enqueue_many(b"abcd", [1, 2]), PayloadError, "add up to 3 bytes; .* has 4"),
        (lambda: q.enqueue_many(bytes(40), [3, 33, 4]), PayloadError, "message 1 is 33 bytes; slot_bytes is 32"),
        (lambda: q.enqueue_many(b"ab", [3, -1]), PayloadError, "negative"),
        (lambda: q.enqueue_many(b"ab", [[1, 1]]), PayloadTypeError, "1-D array of integers"),
        (lambda: q.enqueue_many(b"ab", [1.0, 1.0]), PayloadTypeError, "integers"),
        (lambda: q.enqueue_many(rows(3, 8), [1, 2]), PayloadError, "lengths has 2 entries; payloads has 3"),
        (lambda: q.enqueue_many(rows(2, 8), [1, 9]), PayloadError, "message 1 is 9 bytes; the row is 8"),
        (lambda: q.enqueue_many(rows(9, 8)), PayloadError, "batch of 9 messages exceeds capacity=8"),
        (lambda: q.enqueue_many(rows(2, 8), timeout=-1), ConfigError, "timeout"),
        (lambda: q.enqueue_many([b"x" * 33]), PayloadError, "33 bytes"),
        (lambda: q.enqueue_many([b"ok", "no"]), PayloadTypeError, "payload 1"),
        (
            lambda: q.enqueue_many([b"ab", b"cd"], [2, 2]),
            PayloadTypeError,
            "a list of messages, which takes no lengths=",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert q.stats().enqueued == 3
    assert q.enqueue_many(np.zeros((0, 8), np.uint8)) == 3  # an empty batch: the next msg_id, nothing queued
    assert q.enqueue_many(b"", []) == 3 and q.stats().enqueued == 3
    assert [q.wait_result(i, 10) for i in keep] == [b"keep0", b"keep1", b"keep2"]


def test_a_batch_that_does_not_fit_says_how_many_would_and_waits_for_room(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    first = q.enqueue_many(rows(6, 16))
    assert q.free_slots() == 2
    with pytest.raises(QueueFull, match=r"batch of 3 messages.*2 of 8 slots are free, so 2 of them would fit"):
        q.enqueue_many(rows(3, 16), timeout=0)
    assert q.stats().enqueued == 6  # all or nothing
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        q.enqueue_many(rows(3, 16), timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    # a consumer frees slots while the producer waits: the batch then goes in whole
    threading.Timer(0.05, lambda: q.take_results(first, 6, timeout=10)).start()
    b = rows(8, 16, seed=7)
    second = q.enqueue_many(b, timeout=10)
    assert second == 6 and (q.take_results(second, 8, timeout=10)[0] == b).all()


def test_batches_interleave_with_single_calls_poll_and_outstanding(make_queue):
    q = make_queue(capacity=32, slot_bytes=16)
    a = rows(4, 16, seed=1)
    ids = [q.enqueue(b"s0")] + list(range(q.enqueue_many(a), 5)) + [q.enqueue(b"s5")]
    assert ids == [0, 1, 2, 3, 4, 5] and q.outstanding() == ids
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while len(seen) < 6 and time.monotonic() < deadline:
        seen += q.poll_completions()
    assert seen == ids
    assert q.try_dequeue_result(3) == bytes(a[2])  # one of the batch, singly and out of order
    with pytest.raises(UnknownMessage, match="msg_id 3 was already taken"):
        q.take_results(1, 4)
    data, lens = q.take_results(1, 2)  # 1, 2: out of order too (the tail is 0)
    assert results_as_bytes(data, lens) == [bytes(a[0]), bytes(a[1])]
    assert q.outstanding() == [0, 4, 5] and q.stats().taken == 3
    assert q.wait_result(0) == b"s0"  # the tail moves past everything taken after it
    assert q.outstanding() == [4, 5] and q.free_slots() == 30
    assert results_as_bytes(*q.take_results(4, 2)) == [bytes(a[3]), b"s5"]
    with pytest.raises(UnknownMessage, match="never issued"):
        q.take_results(6, 1)
    assert q.stats().occupied == 0


def test_two_threads_enqueue_many_and_one_enqueue(make_queue, backend):
    per = 300 if backend == "sim" else 2000  # past 255: the byte stamp wraps
    q = make_queue(capacity=256, slot_bytes=16)
    sent: dict[int, bytes] = {}
    lock = threading.Lock()

    errors = []

    def batcher(tag: int):
        try:
            batches(tag)
        except BaseException as exc:  # a thread's error fails the test, not just a warning
            errors.append(exc)

    def batches(tag: int):
        for i in range(per):
            a = np.full((4, 8), tag, np.uint8)
            a[:, 1] = i % 256  # a Python int past 255 into uint8 raises OverflowError (numpy 2)
            a[:, 2] = np.arange(4)
            first = q.enqueue_many(a, timeout=30)
            with lock:
                sent.update({first + j: bytes(a[j]) for j in range(4)})

    def single():
        try:
            singles()
        except BaseException as exc:
            errors.append(exc)

    def singles():
        for i in range(per):
            p = b"s%06d" % i
            m = q.enqueue(p, timeout=30)
            with lock:
                sent[m] = p

    got: dict[int, bytes] = {}
    threads = [threading.Thread(target=batcher, args=(t,)) for t in (1, 2)] + [threading.Thread(target=single)]
    for t in threads:
        t.start()
    total = 9 * per
    deadline = time.monotonic() + 60
    while len(got) < total and time.monotonic() < deadline and not errors:
        first, data, lens = q.take_ready()
        got.update({first + i: r for i, r in enumerate(results_as_bytes(data, lens))})
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got) == list(range(total)) and got == sent


# --- take_results / take_ready ---------------------------------------------------------------------


def test_take_results_out_packed_and_bad_arguments(make_queue):
    q = make_queue(capacity=16, slot_bytes=32)
    buf, lens = packed([5, 0, 32, 17], seed=11)
    first = q.enqueue_many(buf, lens)
    out = np.zeros((4, 32), np.uint8)
    with pytest.raises(ConfigError, match="out must be"):
        q.take_results(first, 4, out=np.zeros((4, 16), np.uint8))
    with pytest.raises(ConfigError, match="cannot be combined"):
        q.take_results(first, 4, out=out, packed=True)
    with pytest.raises(ConfigError, match="errors="):
        q.take_results(first, 4, errors="ignore")
    with pytest.raises(ConfigError, match="0 <= n <= 16"):
        q.take_results(first, 17)
    with pytest.raises(TypeError, match="msg_id must be an int"):
        q.take_results(1.0, 1)
    with pytest.raises(ConfigError, match="or None"):
        q.take_results(first, 1, timeout=-1)
    data, got = q.take_results(first, 4, timeout=10, out=out)
    assert data is out and results_as_bytes(out, got) == split(buf, lens)
    buf, lens = packed([7, 1, 0, 30], seed=12)
    first = q.enqueue_many(buf, lens)
    data, got = q.take_results(np.int64(first), 4, timeout=10, packed=True)
    assert data.ndim == 1 and data.tobytes() == buf and (got == lens).all()
    data, got = q.take_results(first + 4, 0)
    assert data.shape == (0, 32) and got.shape == (0,)


def test_take_results_waits_times_out_taking_nothing_and_stops_with_the_kernel(make_queue, backend):
    q = make_queue(capacity=16, slot_bytes=16)
    with q.paused():
        first = q.enqueue_many(rows(4, 16))
        t0 = time.monotonic()
        with pytest.raises(ResultTimeout, match=r"msg_id 0 \(of msg_ids 0..3\).*paused.*nothing was taken"):
            q.take_results(first, 4, timeout=0.05)
        assert time.monotonic() - t0 >= 0.05
        assert q.outstanding() == [0, 1, 2, 3]
    assert (q.take_results(first, 4, timeout=10)[0] == rows(4, 16)).all()
    if backend == "sim":
        q._kernel.delay_s = 5e-3
    first = q.enqueue_many(rows(16, 16))
    q.shutdown(drain=False)
    if q.stats().processed < q.stats().enqueued:
        with pytest.raises(KernelStopped, match="never will be"):
            q.take_results(first, 16, timeout=30)


def test_take_ready_takes_the_done_prefix_in_order(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    first, data, lens = q.take_ready()
    assert first == 0 and data.shape == (0, 16) and lens.shape == (0,)
    a = rows(10, 16, seed=3)
    q.enqueue_many(a)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        first, data, lens = q.take_ready(max_items=3)
        assert first == len(got) and len(lens) <= 3
        got += results_as_bytes(data, lens)
    assert got == [bytes(r) for r in a]
    q.enqueue_many(rows(3, 16))
    q.wait_result(11, 10)  # taken out of order: take_ready stops before it, then goes on after it
    q.wait_result(12, 10)
    first, data, lens = q.take_ready()
    assert first == 10 and len(lens) == 1
    assert q.take_ready()[0] == 13 and q.stats().occupied == 0
    with pytest.raises(ConfigError, match="max_items"):
        q.take_ready(-1)


# --- device-flagged results ------------------------------------------------------------------------

# the payload twice: BAD_RESULT for a payload longer than out_cap / 2 (the conformance test's plugin)
from .test_conformance import DOUBLE  # noqa: E402


def test_flagged_results_raise_after_taking_the_whole_batch_or_are_marked(backend):
    from gpuq_driver import GpuQueue, QueueConfig

    q = GpuQueue(QueueConfig(capacity=32, slot_bytes=32, plugin=DOUBLE, backend=backend))
    try:
        flagged_results(q)
    finally:
        with pytest.raises(ProtocolError, match="BAD_RESULT"):  # the queue's life saw BAD_RESULT
            q.close()


def flagged_results(q):
    buf, lens = packed([3, 20, 5, 17, 1], seed=4)  # 20 and 17: twice is > 32, BAD_RESULT
    msgs = split(buf, lens)
    first = q.enqueue_many(buf, lens)
    with pytest.raises(ProtocolError, match=r"msg_id 1: device reported BAD_RESULT \(2 of the 5 results") as exc:
        q.take_results(first, 5, timeout=10)
    data, got = exc.value.results
    assert exc.value.msg_ids == [1, 3] and list(got) == [6, FAILED, 10, FAILED, 2]
    assert [bytes(data[i, : 6 if i == 0 else 10 if i == 2 else 2]) for i in (0, 2, 4)] == [m * 2 for m in msgs[::2]]
    assert q.stats().occupied == 0  # all taken: the ring moved on
    first = q.enqueue_many(buf, lens)
    data, got = q.take_results(first, 5, timeout=10, errors="mark", packed=True)
    assert list(got) == [6, FAILED, 10, FAILED, 2] and data.tobytes() == b"".join(m * 2 for m in msgs[::2])
    first = q.enqueue_many(buf, lens)
    with q.view_results(first, 5, timeout=10, errors="mark") as v:
        assert list(v.lengths) == [6, FAILED, 10, FAILED, 2] and (v.flags[[1, 3]] != 3).all()
    first = q.enqueue_many(buf, lens)
    with pytest.raises(ProtocolError, match="BAD_RESULT"):  # a view that would hold a flagged result
        q.view_results(first, 5, timeout=10)
    assert q.stats().occupied == 0 and not q._views
    time.sleep(0.01)
    first, data, got = q.take_ready(errors="mark")
    assert len(got) == 0


# --- result views ------------------------------------------------------------------------------------


def test_a_result_view_lends_the_ring_until_released(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    a = rows(8, 16, seed=5)
    first = q.enqueue_many(a)
    v = q.view_results(first, 8, timeout=10)
    assert isinstance(v, ResultView) and len(v) == 8 and v.first == 0
    assert (v.data == a).all() and (v.lengths == 16).all() and (v.flags == 3).all()
    assert list(v.msg_ids) == list(range(8))
    with pytest.raises(ValueError):
        v.data[0, 0] = 1  # read-only: the ring is the device's
    # while held: nobody else takes them, poll does not report them, no slot frees
    assert q.try_dequeue_result(0) is None and q.try_dequeue_result(5) is None
    with pytest.raises(UnknownMessage, match=r"^'?msg_id 0 is held by a result view \(view_results\)"):
        q.wait_result(0, 0.1)  # said "already taken or never issued" before the thirteenth session
    with pytest.raises(UnknownMessage, match="held by a result view"):
        q.take_results(3, 2)
    assert q.poll_completions() == [] and q.outstanding() == []
    s = q.stats()
    assert s.occupied == 8 and s.taken == 0 and q.free_slots() == 0
    with pytest.raises(QueueFull, match="held by a result view"):
        q.enqueue(b"x", timeout=0)
    with pytest.raises(QueueFull, match="held by a result view"):
        q.enqueue_many(rows(1, 16), timeout=0)
    v.release()
    v.release()  # idempotent
    with pytest.raises(GpuqError, match="released"):
        _ = v.data
    assert q.stats().taken == 8 and q.free_slots() == 8
    assert q.wait_result(q.enqueue(b"again"), 10) == b"again"


def test_views_chain_in_order_release_in_any_order_and_stop_at_the_ring_end(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    q.take_results(q.enqueue_many(rows(5, 16)), 5, timeout=10)  # head and tail at 5
    a = rows(8, 16, seed=6)
    first = q.enqueue_many(a)
    v1 = q.view_results(first, 8, timeout=10)
    assert (v1.first, len(v1)) == (5, 3)  # stops at the ring's end
    with pytest.raises(ConfigError, match="must start at msg_id 8"):
        q.view_results(10, 2, timeout=10)
    v2 = q.view_results(8, 2, timeout=10)
    v3 = q.view_results(10, 3, timeout=10)
    assert (v2.data == a[3:5]).all() and (v3.data == a[5:8]).all()
    v2.release()  # a later view first: freed only with the ones before it
    assert q.stats().taken == 7 and q.free_slots() == 0
    v1.release()
    assert q.stats().taken == 10 and q.free_slots() == 5
    v3.release()
    assert q.stats().taken == 13 and q.free_slots() == 8
    with q.view_results(q.enqueue_many(a[:2]), 2, timeout=10) as v:
        assert (v.data == a[:2]).all()
    assert v.released and q.stats().occupied == 0


def test_a_view_after_results_taken_out_of_order_starts_past_them(make_queue):
    """The next view starts at the oldest result neither taken nor held: results that
    take_results took out of order after a held view are skipped, not demanded."""
    q = make_queue(capacity=16, slot_bytes=16)
    a = rows(6, 16, seed=7)
    first = q.enqueue_many(a)
    v1 = q.view_results(first, 2, timeout=10)
    data, lens = q.take_results(first + 2, 2, timeout=10)  # taken ahead, past the view
    assert (data[:, :16] == a[2:4]).all()
    with pytest.raises(ConfigError, match="must start at msg_id 4,"):
        q.view_results(first + 2, 2, timeout=10)  # taken: the message names the right start
    v2 = q.view_results(first + 4, 2, timeout=10)
    assert (v2.first, len(v2)) == (4, 2) and (v2.data == a[4:6]).all()
    assert q.try_dequeue_result(4) is None and q.outstanding() == []
    v1.release()  # the tail moves past the view and what was taken after it, up to v2
    assert q.stats().taken == 4 and q.stats().occupied == 2 and q.free_slots() == 14
    assert q.try_dequeue_result(4) is None  # still held by v2
    v2.release()
    assert q.stats().taken == 6 and q.free_slots() == 16
    assert q.wait_result(q.enqueue(b"next"), 10) == b"next"


def test_a_view_dropped_while_the_consumer_lock_is_busy_does_not_hold_the_ring(make_queue):
    """A view collected while another thread held the consumer lock is released by the next
    call that takes that lock (poll_completions, outstanding, stats) or by a producer that
    waits for room, not only by a batch take: single-call users are not held up for ever."""
    q = make_queue(capacity=8, slot_bytes=16)

    def drop_view_while_busy():
        fill = -q.stats().enqueued % 8  # a view stops at the ring's end: start one at slot 0
        q.take_results(q.enqueue_many(rows(fill, 16)), fill, timeout=10)
        v = q.view_results(q.enqueue_many(rows(8, 16)), 8, timeout=10)
        with q._clock:  # as if a consumer thread were inside poll_completions
            with pytest.warns(ResourceWarning, match="dropped unreleased"):
                del v
        assert q.free_slots() == 0

    drop_view_while_busy()
    assert q.wait_result(q.enqueue(b"p", timeout=10), 10) == b"p"  # the producer released it
    for call in (q.poll_completions, q.outstanding, q.stats):
        drop_view_while_busy()
        call()
        assert q.free_slots() == 8, call
        assert q.wait_result(q.enqueue(b"q", timeout=0), 10) == b"q"


def test_data_of_a_view_or_reservation_after_close_raises_queue_closed(backend):
    """After close() the rings are freed (on the GPU, unmapped): .data refuses instead of
    handing out a view of freed memory."""
    from gpuq_driver import GpuQueue, QueueConfig

    with GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend=backend)) as q:
        v = q.view_results(q.enqueue_many(rows(2, 16)), 2, timeout=10)
        assert v.data.shape == (2, 16)
    with pytest.raises(QueueClosed, match="closed"):
        _ = v.data
    v.release()
    if backend == "sim":  # abandoned (as at interpreter exit) with a reservation open; on the
        # GPU an abandoned queue keeps its device until the process ends
        q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend=backend))
        r = q.reserve(2)
        q._abandon()
        with pytest.raises(QueueClosed):
            _ = r.data
        with pytest.raises(QueueClosed):
            r.commit()
        assert not r.open


def test_a_dropped_view_is_released(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    first = q.enqueue_many(rows(8, 16))
    with pytest.warns(ResourceWarning, match="dropped unreleased"):
        q.view_results(first, 8, timeout=10)  # not kept: released as it is collected
    assert q.free_slots() == 8 and q.stats().taken == 8
    v = q.view_results(q.enqueue_many(rows(2, 16)), 2, timeout=10)
    q._dropped.append(v._rec)  # as if collected while the consumer lock was busy
    v._held = False
    assert q.free_slots() == 6
    assert q.take_ready()[0] == 10 and q.free_slots() == 8  # the next batch take releases it


def test_a_view_held_at_close_is_harmless(backend):
    from gpuq_driver import GpuQueue, QueueConfig

    q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend=backend))
    v = q.view_results(q.enqueue_many(rows(2, 16)), 2, timeout=10)
    q.close()
    v.release()  # nothing to free any more
    with pytest.raises(QueueClosed):
        q.enqueue_many(rows(1, 16))
    with pytest.raises(QueueClosed):
        q.take_results(0, 1)
    with pytest.raises(QueueClosed):
        q.take_ready()
    with pytest.raises(QueueClosed):
        q.reserve(1)


# --- reserve / commit ------------------------------------------------------------------------------


def test_reserve_fill_in_place_and_commit(make_queue):
    q = make_queue(capacity=16, slot_bytes=32)
    r = q.reserve(4)
    assert isinstance(r, Reservation) and len(r) == 4 and r.first == 0 and r.open
    assert r.data.shape == (4, 32) and (r.lengths == 32).all()
    assert q.free_slots() == 12
    a = rows(4, 32, seed=8)
    r.data[:] = a
    r.lengths[:] = [32, 0, 5, 31]
    assert r.commit() == 0 and not r.open
    with pytest.raises(GpuqError, match="committed or cancelled"):
        _ = r.data
    with pytest.raises(GpuqError, match="already committed"):
        r.commit()
    assert results_as_bytes(*q.take_results(0, 4, timeout=10)) == [bytes(a[0]), b"", bytes(a[2, :5]), bytes(a[3, :31])]
    b = rows(3, 32, seed=9)
    with q.reserve(3) as r:  # committed at the end of the block, lengths slot_bytes
        r.data[:] = b
    assert [q.wait_result(i, 10) for i in (4, 5, 6)] == [bytes(x) for x in b]
    with q.reserve(3) as r:
        r.data[:, :3] = np.frombuffer(b"xyz", np.uint8)
        r.commit(3)
    assert [q.wait_result(i, 10) for i in range(r.first, r.first + 3)] == [b"xyz"] * 3
    r = q.reserve(5)
    r.data[:2, :2] = np.frombuffer(b"hi", np.uint8)
    assert r.commit([2, 2], n=2) == r.first  # a prefix: the other 3 slots go back
    assert q.stats().enqueued == r.first + 2
    assert q.take_results(r.first, 2, timeout=10)[1].tolist() == [2, 2]


def test_reserve_cancel_errors_and_the_ring_end(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    with pytest.raises(RuntimeError):
        with q.reserve(2) as r:
            r.data[:] = 7
            raise RuntimeError("the fill failed")
    assert not r.open and q.stats().enqueued == 0  # cancelled: nothing published
    r = q.reserve(2)
    with pytest.raises(PayloadError, match="message 1 is 17 bytes"):
        r.commit([1, 17])
    with pytest.raises(PayloadError, match="lengths has 1 entries; the commit publishes 2 messages"):
        r.commit([1])
    assert r.open  # still open after a refused commit
    r.cancel()
    r.cancel()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="n"):
            q.reserve(bad)
    q.take_results(q.enqueue_many(rows(6, 16)), 6, timeout=10)
    r = q.reserve(5)
    assert (r.first, len(r)) == (6, 2)  # never past the ring's end
    r.data[:] = 1
    r.commit()
    with q.reserve(5) as r2:
        assert (r2.first, len(r2)) == (8, 5)
    q.take_results(6, 7, timeout=10)
    # a reservation that does not fit waits, then says how many would
    q.enqueue_many(rows(6, 16))
    with pytest.raises(QueueFull, match="batch of 3 messages.*2 of 8 slots are free"):
        q.reserve(3, timeout=0)
    assert q.free_slots() == 2


def test_an_open_reservation_holds_the_producer_lock(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    r = q.reserve(2)
    for call in (lambda: q.enqueue(b"x"), lambda: q.enqueue_many([b"x"]), lambda: q.reserve(1)):
        with pytest.raises(GpuqError, match="holds an open reservation"):  # not a deadlock
            call()
    order = []

    def other():
        order.append(("other", q.enqueue(b"other", timeout=10)))

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.05)
    assert order == []  # waits for the commit
    r.data[:, :1] = ord("r")
    r.commit(1)
    t.join(10)
    assert order == [("other", 2)]
    assert [q.wait_result(i, 10) for i in range(3)] == [b"r", b"r", b"other"]


def test_shutdown_from_the_reserving_thread_raises_and_a_second_call_drains(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    r = q.reserve(2)
    with pytest.raises(GpuqError, match="holds an open reservation"):
        q.shutdown()
    assert q.free_slots() == 0  # shutdown has begun: nothing new is accepted ...
    r.lengths[:] = 0
    r.commit()  # ... but the reservation taken before it is published
    q.shutdown()
    assert q.take_results(0, 2, timeout=1)[1].tolist() == [0, 0]


def test_close_from_the_reserving_thread_cancels_the_reservation_and_frees_the_device(make_queue):
    """close() (also ``with GpuQueue(...)`` left by an exception) from the thread that holds an open
    reservation cancels it and frees everything: it used to raise the lock's GpuqError and leave the
    kernel running, so the next queue on the device was refused ("already running"; the state
    machine test met it when Hypothesis stopped an example inside a reservation)."""
    q = make_queue(capacity=16, slot_bytes=16)
    assert q.wait_result(q.enqueue(b"before"), 10) == b"before"
    r = q.reserve(3)
    r.data[:, :4] = np.frombuffer(b"lost", np.uint8)
    q.close()
    assert q.closed and q._kernel.closed and not r.open
    q2 = make_queue(capacity=16, slot_bytes=16)  # the device is free again
    assert q2.wait_result(q2.enqueue(b"after"), 10) == b"after"


def test_a_reservation_cancelled_by_close_says_the_queue_is_closed(make_queue):
    """After close() cancelled the calling thread's open reservation, its commit (also the commit
    of a ``with q.reserve()`` block left without an exception) raises QueueClosed: the messages
    written into it are not published, and the user never cancelled it."""
    q = make_queue(capacity=16, slot_bytes=16)
    r = q.reserve(2)
    q.close()
    with pytest.raises(QueueClosed, match="close"):
        r.commit()
    r.cancel()  # nothing, as after any cancel
    with pytest.raises(GpuqError, match="committed or cancelled"):
        _ = r.data
    q2 = make_queue(capacity=16, slot_bytes=16)
    with pytest.raises(QueueClosed, match="close"):
        with q2.reserve(2) as r2:
            r2.data[:, :1] = 1
            q2.close()
    q3 = make_queue(capacity=16, slot_bytes=16)
    with q3.reserve(2) as r3:
        r3.commit()
        q3.close()  # committed before: the block ends quietly
    with pytest.raises(GpuqError, match="already committed"):
        r3.commit()


def reserve_then_call_from_another_thread(q, call):
    """A reservation of 3 slots held by this thread, and ``call`` (q.close, q.shutdown) started in
    another thread 50 ms ago: (the reservation, that thread)."""
    r = q.reserve(3)
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.05)
    return r, t


def test_close_from_another_thread_waits_for_the_reservation_and_does_not_cancel_it(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    r, t = reserve_then_call_from_another_thread(q, q.close)
    assert t.is_alive() and r.open and not q.closed  # waits: only the reserving thread's close cancels
    r.data[:, :2] = np.frombuffer(b"ok", np.uint8)
    assert r.commit(2) == 0
    t.join(10)
    assert not t.is_alive() and q.closed and q._kernel.closed


def test_shutdown_from_another_thread_waits_for_the_commit_and_drains_it(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)
    r, t = reserve_then_call_from_another_thread(q, q.shutdown)
    assert t.is_alive()
    r.data[:, :2] = np.frombuffer(b"ok", np.uint8)
    r.commit(2)
    t.join(10)
    assert not t.is_alive() and q.stats().kernel == "exited"
    assert results_as_bytes(*q.take_results(0, 3, timeout=1)) == [b"ok"] * 3
    with pytest.raises(QueueClosed):
        q.reserve(1)


def test_cancel_during_a_commit_in_another_thread_waits_and_does_nothing(make_queue):
    """A review found that commit() and cancel() in two threads could both see the reservation
    open: the producer lock was released twice, once while the commit was still publishing."""
    q = make_queue(capacity=16, slot_bytes=16)
    r = q.reserve(3)
    r.data[:, :2] = np.frombuffer(b"ok", np.uint8)
    publishing, go_on = threading.Event(), threading.Event()
    publish = q._publish_locked

    def slow_publish(*args):
        publishing.set()
        go_on.wait(10)
        return publish(*args)

    q._publish_locked = slow_publish
    committed = []
    t = threading.Thread(target=lambda: committed.append(r.commit(2)))
    t.start()
    assert publishing.wait(10)
    c = threading.Thread(target=r.cancel)
    c.start()
    c.join(0.05)
    assert c.is_alive()  # it waits for the commit under way
    go_on.set()
    t.join(10)
    c.join(10)
    assert committed == [0] and not r.open
    assert results_as_bytes(*q.take_results(0, 3, timeout=10)) == [b"ok"] * 3
    assert q.wait_result(q.enqueue(b"after", timeout=1), 10) == b"after"  # the producer lock works


def test_a_dropped_open_reservation_is_cancelled(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    with pytest.warns(ResourceWarning, match="dropped open"):
        q.reserve(2)
    assert q.wait_result(q.enqueue(b"free", timeout=1), 10) == b"free"


def test_a_batch_into_a_parked_queue_launches_it(make_queue):
    q = make_queue(capacity=64, slot_bytes=16, linger_ms=0.0)
    deadline = time.monotonic() + 10
    while q.stats().kernel != "parked":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    launches = q.stats().launches
    first = q.enqueue_many(rows(32, 16))
    assert (q.take_results(first, 32, timeout=10)[0] == rows(32, 16)).all()
    assert q.stats().launches > launches
    while q.stats().kernel != "parked":
        assert time.monotonic() < deadline + 10
        time.sleep(0.005)
    with q.reserve(4) as r:
        r.lengths[:] = 1
    assert q.take_results(r.first, 4, timeout=10)[1].tolist() == [1] * 4


def test_many_batches_byte_for_byte(make_queue, backend):
    """Random batches (every form, sizes, counts, reservations, single messages), taken in batches
    of other sizes (copies, views, the ready prefix); every result checked."""
    count = 200_000 if backend == "cuda" else 3000
    sb = 128
    q = make_queue(capacity=512, slot_bytes=sb)
    rng = np.random.default_rng(99)
    sent: dict[int, bytes] = {}
    got: dict[int, bytes] = {}
    taken_to = 0

    def take_some():
        nonlocal taken_to
        k = min(int(rng.integers(1, 300)), len(sent) - taken_to)
        how = int(rng.integers(0, 3))
        if how == 0:
            data, lens = q.take_results(taken_to, k, timeout=30)
        elif how == 1:
            with q.view_results(taken_to, k, timeout=30) as v:
                data, lens = v.data.copy(), v.lengths
        else:
            first, data, lens = q.take_ready(max_items=k)
            assert first == taken_to
        got.update({taken_to + i: r for i, r in enumerate(results_as_bytes(data, lens))})
        taken_to += len(lens)

    while len(sent) < count:
        n = int(rng.integers(1, 200))
        while q.free_slots() < n:
            take_some()
        form = int(rng.integers(0, 5))
        if form == 0:
            a = rng.integers(0, 256, (n, int(rng.integers(0, sb + 1))), dtype=np.uint8)
            msgs, first = [bytes(x) for x in a], q.enqueue_many(a, timeout=0)
        elif form == 1:
            lens = rng.integers(0, sb + 1, n)
            buf = rng.integers(0, 256, int(lens.sum()), dtype=np.uint8).tobytes()
            msgs, first = split(buf, lens), q.enqueue_many(buf, lens, timeout=0)
        elif form == 2:
            lens = rng.integers(0, sb + 1, n)
            a = rng.integers(0, 256, (n, sb), dtype=np.uint8)
            msgs, first = [bytes(a[i, :m]) for i, m in enumerate(lens)], q.enqueue_many(a, lens, timeout=0)
        elif form == 3:
            msgs = [rng.integers(0, 256, int(rng.integers(0, sb + 1)), dtype=np.uint8).tobytes() for _ in range(4)]
            first = q.enqueue(msgs[0], timeout=0)
            for m in msgs[1:]:
                q.enqueue(m, timeout=0)
        else:
            with q.reserve(n, timeout=0) as r:
                lens = rng.integers(0, sb + 1, len(r))
                fill = rng.integers(0, 256, (len(r), sb), dtype=np.uint8)
                r.data[:] = fill
                r.lengths[:] = lens
            msgs, first = [bytes(fill[i, :m]) for i, m in enumerate(lens)], r.first
        assert first == len(sent)
        sent.update({first + i: m for i, m in enumerate(msgs)})
    while taken_to < len(sent):
        take_some()
    assert sorted(got) == list(range(len(sent)))
    assert [m for m in sent if got[m] != sent[m]] == []
    s = q.stats()
    assert s.enqueued == s.processed == s.taken == len(sent) and s.occupied == 0


def test_a_batch_take_with_plugin_failures_raises_message_failed_naming_each(make_queue):
    """GPUQ_FAIL(code) in a batch: the whole range is taken, MessageFailed names the first failed
    msg_id and code and carries every one in .failures; errors="mark" gives FAILED lengths."""
    from gpuq_driver import MessageFailed

    from .test_params import ODD  # fails a message whose first byte is odd, with code msg_id % 1000 + 1

    q = make_queue(capacity=16, slot_bytes=16, plugin=ODD)
    rows = np.array([[b] * 4 for b in (2, 3, 4, 5, 6)], dtype=np.uint8)
    first = q.enqueue_many(rows)
    with pytest.raises(MessageFailed) as exc:
        q.take_results(first, 5, timeout=10)
    e = exc.value
    assert (e.msg_id, e.code, e.plugin) == (first + 1, first + 2, "odd")
    assert e.failures == {first + 1: first + 2, first + 3: first + 4} and e.msg_ids == [first + 1, first + 3]
    data, lens = e.results
    assert list(lens) == [4, FAILED, 4, FAILED, 4] and bytes(data[2, :4]) == bytes([4] * 4)
    first = q.enqueue_many(rows)
    data, lens = q.take_results(first, 5, timeout=10, errors="mark")
    assert list(lens) == [4, FAILED, 4, FAILED, 4]
    assert q.stats().occupied == 0 and q.wait_result(q.enqueue(b"\x02\x02"), timeout=10) == b"\x02\x02"


def test_range_calls_refuse_msg_ids_past_uint64_as_never_issued(make_queue):
    """msg_ids are uint64: a range reaching past 2**64 was never issued (UnknownMessage, as for any
    msg_id not issued yet), not an OverflowError from NumPy; nothing queued is disturbed."""
    q = make_queue(capacity=8, slot_bytes=16)
    kept = q.enqueue(b"kept")
    for first, n in ((2**64, 1), (2**70, 1), (2**64 - 1, 2)):
        with pytest.raises(UnknownMessage, match=f"msg_id {first} was never issued"):
            q.take_results(first, n, timeout=0)
        with pytest.raises(UnknownMessage, match=f"msg_id {first} was never issued"):
            q.view_results(first, n, timeout=0)
    assert q.wait_result(kept, timeout=10) == b"kept"


def test_a_view_of_more_than_capacity_names_its_own_range(make_queue):
    q = make_queue(capacity=8, slot_bytes=16)
    with pytest.raises(ConfigError, match="n=9 is out of range: 1 <= n <= 8"):
        q.view_results(0, 9)
    with pytest.raises(ConfigError, match="n=0 is out of range: 1 <= n <= 8"):
        q.view_results(0, 0)
    with pytest.raises(ConfigError, match="n=9 is out of range: 0 <= n <= 8"):
        q.take_results(0, 9)
