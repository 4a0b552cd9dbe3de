"""gpuq_driver.aio.AsyncQueue: asyncio over a GpuQueue, on the simulator everywhere and on the GPU
where one exists.  The event loop's thread must not spin: its CPU time while idle is measured."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from gpuq_driver import (
    ConfigError,
    GpuqError,
    KernelStopped,
    MessageFailed,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
)
from gpuq_driver.aio import AsyncQueue


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_round_trip_and_errors(make_queue):
    q = make_queue(capacity=64, slot_bytes=32)

    async def main():
        async with AsyncQueue(q) as aq:
            mid = await aq.enqueue(b"hello")
            assert await aq.result(mid) == b"hello"
            with pytest.raises(UnknownMessage):
                await aq.result(mid)  # taken
            with pytest.raises(UnknownMessage):
                await aq.result(10**6)  # never issued
            with pytest.raises(TypeError):
                await aq.result("0")
            with pytest.raises(ConfigError):
                await aq.result(0, timeout=-1)
            with q.paused():
                mid = await aq.enqueue(b"twice")
                first = asyncio.ensure_future(aq.result(mid))
                await asyncio.sleep(0.01)
                with pytest.raises(GpuqError, match="already awaited"):
                    await aq.result(mid)
            assert await first == b"twice"
            rows = np.arange(5 * 16, dtype=np.uint8).reshape(5, 16)
            first = await aq.enqueue_many(rows)
            data, lens = await aq.take_results(first, 5)
            assert (data[:, :16] == rows).all() and (lens == 16).all()
            first = await aq.enqueue_many(rows)
            with await aq.view_results(first, 5) as v:
                assert (v.data[:, :16] == rows).all()
        assert aq.closed

    run(main())


def test_a_message_the_plugin_failed_raises_message_failed(make_queue):
    """score fails an empty payload with code 1 (SCORE_BAD_PAYLOAD): result() and completions()
    raise MessageFailed, as docs/api.md says, and the queue goes on."""
    w = np.ones((2, 3), np.float32)
    q = make_queue(capacity=16, slot_bytes=64, plugin="score", params=w)
    x = np.array([1.0, 2.0], np.float32)

    async def main():
        async with AsyncQueue(q) as aq:
            with pytest.raises(MessageFailed, match="failed the message with code 1") as info:
                await aq.result(await aq.enqueue(b""))
            assert info.value.code == 1
            ok = await aq.enqueue(x)
            await aq.enqueue(b"")
            seen = []
            with pytest.raises(MessageFailed) as info:
                async for msg_id, result in aq.completions():
                    seen.append((msg_id, np.frombuffer(result, np.float32).tolist()))
            assert seen == [(ok, [3.0, 3.0, 3.0])] and info.value.msg_id == ok + 1
            last = await aq.enqueue(b"")
            q.shutdown()
            got = [item async for item in aq.completions(errors="return")]
            assert [m for m, _ in got] == [last] and isinstance(got[0][1], MessageFailed)

    run(main())


def test_ten_thousand_concurrent_awaits(make_queue, backend):
    """10,000 tasks each enqueue a message and await its result at once; every result is checked."""
    q = make_queue(capacity=16384, slot_bytes=64)

    async def main():
        async with AsyncQueue(q) as aq:

            async def one(i: int):
                p = i.to_bytes(8, "little") * (1 + i % 8)
                return p, await aq.result(await aq.enqueue(p))

            t0 = time.perf_counter()
            pairs = await asyncio.gather(*(one(i) for i in range(10_000)))
            dt = time.perf_counter() - t0
            assert [p for p, r in pairs if p != r] == []
            print(f"\n10,000 concurrent awaits on {backend}: {dt:.3f} s, poller looks {aq.looks}")

    run(main())
    s = q.stats()
    assert s.enqueued == s.taken == 10_000 + 0 and s.occupied == 0


def test_more_tasks_than_slots_wait_for_room_without_blocking_the_loop(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        async with AsyncQueue(q) as aq:

            async def one(i: int):
                p = b"%06d" % i
                return p, await aq.result(await aq.enqueue(p, timeout=60))

            pairs = await asyncio.gather(*(one(i) for i in range(400)))
            assert all(p == r for p, r in pairs)
            first = await aq.enqueue_many([b"a"] * 16)  # a whole ring's batch, once there is room
            assert (await aq.take_results(first, 16))[1].tolist() == [1] * 16
            with q.paused():
                for _ in range(16):
                    await aq.enqueue(b"x")
                with pytest.raises(QueueFull, match="16 of 16 slots|0 of 16 slots"):
                    await aq.enqueue(b"y", timeout=0.05)
        t.cancel()
        assert ticks > 5  # the loop kept running

    run(main())


def test_a_timed_out_or_cancelled_await_leaves_the_result_in_the_queue(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)

    async def main():
        async with AsyncQueue(q) as aq:
            with q.paused():
                mid = await aq.enqueue(b"later")
                with pytest.raises(ResultTimeout, match="paused"):
                    await aq.result(mid, timeout=0.02)
                task = asyncio.ensure_future(aq.result(mid))
                await asyncio.sleep(0.01)
                task.cancel()
            await asyncio.sleep(0.05)  # processed now; nobody awaits it
            assert q.wait_result(mid, 10) == b"later"
            with q.paused():
                first = await aq.enqueue_many([b"a", b"b"])
                with pytest.raises(ResultTimeout, match="not all done"):
                    await aq.take_results(first, 2, timeout=0.02)
            assert (await aq.take_results(first, 2, timeout=10))[1].tolist() == [1, 1]

    run(main())


def collect_completions(aq) -> tuple:
    """A task appending each ``(msg_id, result)`` of ``aq.completions()`` to a list; it returns
    "ended" when the iterator ends: (the task, the list)."""
    got = []

    async def consume():
        async for item in aq.completions():
            got.append(item)
        return "ended"

    return asyncio.create_task(consume()), got


def test_completions_in_order_then_the_end_after_shutdown(make_queue):
    q = make_queue(capacity=256, slot_bytes=16)

    async def main():
        async with AsyncQueue(q) as aq:
            task, got = collect_completions(aq)
            await asyncio.sleep(0.02)
            kept = await aq.enqueue(b"awaited")  # awaited by result(): left to it
            awaited = asyncio.ensure_future(aq.result(kept))
            await aq.enqueue_many([b"%03d" % i for i in range(100)])
            threading.Thread(target=lambda: [q.enqueue(b"sync%d" % i) for i in range(20)]).start()
            deadline = time.monotonic() + 30
            while len(got) < 120 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert await awaited == b"awaited"
            q.shutdown()
            await asyncio.wait_for(task, 10)  # ends once shut down and drained
            assert [m for m, _ in got] == list(range(1, 121))
            assert [r for _, r in got] == [b"%03d" % i for i in range(100)] + [b"sync%d" % i for i in range(20)]

    run(main())


def test_completions_ends_when_the_async_queue_is_closed(make_queue):
    """completions() ends (as documented) when the AsyncQueue is closed while it waits, rather
    than raising QueueClosed; an iterator started after close ends at once."""
    q = make_queue(capacity=16, slot_bytes=16)

    async def main():
        aq = AsyncQueue(q)
        task, got = collect_completions(aq)
        await aq.enqueue(b"one")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # waiting for the next one now
        aq.close()
        assert await asyncio.wait_for(task, 10) == "ended"
        assert got == [(0, b"one")]
        assert [x async for x in aq.completions()] == []

    run(main())


def test_timeouts_of_the_async_calls_say_what_the_blocking_calls_say(make_queue):
    """QueueFull after an awaited enqueue names the timeout that applied (the config's for None)
    and what holds the next slot, as the blocking calls do; a range's ResultTimeout says the
    queue is paused and that nothing was taken."""
    q = make_queue(capacity=4, slot_bytes=16, enqueue_timeout_s=0.05)

    async def main():
        async with AsyncQueue(q) as aq:
            with q.paused():
                first = await aq.enqueue_many([b"x"] * 4)
                with pytest.raises(
                    QueueFull, match=r"waited 0.05 s\).*msg_id 0 is not processed yet: the queue is paused"
                ):
                    await aq.enqueue(b"y")
                with pytest.raises(
                    QueueFull, match=r"batch of 2 messages \(waited 0.02 s\).*msg_id 0 is not processed yet"
                ):
                    await aq.enqueue_many([b"y"] * 2, timeout=0.02)
                with pytest.raises(ResultTimeout, match="paused.*nothing was taken"):
                    await aq.take_results(first, 4, timeout=0.02)
            assert (await aq.take_results(first, 4, timeout=10))[1].tolist() == [1] * 4

    run(main())


def test_kernel_stopped_and_closing(make_queue, backend):
    q = make_queue(capacity=4096, slot_bytes=16)
    if backend == "sim":
        q._kernel.delay_s = 2e-3

    async def main():
        aq = AsyncQueue(q)
        ids = [await aq.enqueue(b"z") for _ in range(3000)]
        q.shutdown(drain=False)
        outcomes = await asyncio.gather(*(aq.result(m, timeout=30) for m in ids), return_exceptions=True)
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, KernelStopped) for o in lost)
        assert len(outcomes) - len(lost) == q.stats().processed
        aq.close()
        with pytest.raises(QueueClosed):
            await aq.result(0)

    run(main())


def test_close_fails_what_still_awaits(make_queue):
    q = make_queue(capacity=16, slot_bytes=16)

    async def main():
        aq = AsyncQueue(q)
        with q.paused():
            mid = await aq.enqueue(b"x")
            task = asyncio.ensure_future(aq.result(mid))
            await asyncio.sleep(0.01)
            aq.close()
            with pytest.raises(QueueClosed):
                await task
        assert q.wait_result(mid, 10) == b"x"  # still in the queue

    run(main())


def test_two_event_loops_in_two_threads(make_queue):
    q = make_queue(capacity=1024, slot_bytes=16)
    aq = AsyncQueue(q)
    out: dict[int, list] = {}

    def worker(tag: int):
        async def main():
            return [await aq.result(await aq.enqueue(b"%d-%d" % (tag, i))) for i in range(200)]

        out[tag] = asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    aq.close()
    assert out == {t: [b"%d-%d" % (t, i) for i in range(200)] for t in (1, 2)}


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def test_the_loop_thread_does_not_spin_while_idle(make_queue):
    """While a completions() iterator and an await on a paused queue wait, the event loop's
    thread uses (almost) no CPU; the poller sleeps too (1-5 ms pauses), and with nothing awaited
    it uses none.  The figures are printed (pytest -s)."""
    q = make_queue(capacity=64, slot_bytes=16)

    async def main():
        async with AsyncQueue(q) as aq:

            async def consume():
                async for _ in aq.completions():
                    pass

            q.pause()
            mid = await aq.enqueue(b"x")
            waiting = [asyncio.create_task(consume()), asyncio.ensure_future(aq.result(mid))]
            await asyncio.sleep(0.2)  # past the poller's spin phase
            poller = aq._thread
            t_loop, t_poll, wall = time.thread_time(), thread_cpu(poller), time.perf_counter()
            await asyncio.sleep(1.0)
            wall = time.perf_counter() - wall
            loop_share = (time.thread_time() - t_loop) / wall
            poll_share = (thread_cpu(poller) - t_poll) / wall
            q.resume()
            assert await waiting[1] == b"x"
            waiting[0].cancel()
            await asyncio.sleep(0.6)  # nothing awaited now: the poller blocks
            t_idle, wall = thread_cpu(poller), time.perf_counter()
            await asyncio.sleep(1.0)
            idle_share = (thread_cpu(poller) - t_idle) / (time.perf_counter() - wall)
        print(
            f"\nidle CPU: event loop thread {loop_share:.2%}, poller {poll_share:.2%} (an await and an "
            f"iterator pending), poller {idle_share:.3%} (nothing awaited)"
        )
        assert loop_share < 0.02
        assert poll_share < 0.25
        assert idle_share < 0.01

    run(main())


def test_device_arrays_through_asyncio_on_the_simulator():
    """enqueue_device and view_results_device awaited (the simulator's "device" arrays are numpy):
    more rows than the ring holds wait for room without blocking the loop, every result is right."""
    import gpuq_driver

    q = gpuq_driver.GpuQueue(gpuq_driver.QueueConfig(backend="sim", capacity=16, slot_bytes=32, result_memory="device"))
    rows = np.random.default_rng(3).integers(0, 256, (3, 12, 32), dtype=np.uint8)

    async def main():
        async with AsyncQueue(q) as aq:
            got = []

            async def consume(first, n):
                done = 0
                while done < n:
                    v = await aq.view_results_device(first + done, n - done, timeout=10)
                    got.append(np.asarray(v.data)[:, :32].copy())
                    done += len(v)
                    v.release()
                    del v

            tasks = []
            for batch in rows:  # 3 x 12 rows into 16 slots: the later batches await room
                first = await aq.enqueue_device(batch, timeout=10)
                tasks.append(asyncio.create_task(consume(first, len(batch))))
            await asyncio.gather(*tasks)
            return np.concatenate(got)

    try:
        assert np.array_equal(run(main()), rows.reshape(-1, 32))
    finally:
        q.close()


def test_a_cancel_landing_after_the_wake_up_leaves_the_result_in_the_queue(make_queue):
    """asyncio.timeout() (and wait_for on Python 3.12+) cancels the task from a timer callback:
    one that runs after the poller's wake-up but before the task resumes must not lose the
    result (it used to be taken at the wake-up, then dropped by the cancelled task)."""
    q = make_queue(capacity=16, slot_bytes=16)

    async def main():
        async with AsyncQueue(q) as aq:
            with q.paused():
                mid = await aq.enqueue(b"kept")
                task = asyncio.ensure_future(aq.result(mid))
                await asyncio.sleep(0.01)
                wake = aq._deliver

                def wake_then_cancel(ids):  # the timer's cancel, in the same loop iteration
                    wake(ids)
                    task.cancel()

                aq._deliver = wake_then_cancel
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert q.wait_result(mid, 10) == b"kept"

    run(main())


def test_completions_leaves_an_awaited_result_to_its_await_after_the_wake_up(make_queue):
    """result() and a completions() iterator on one loop: the iterator, woken with the await, must
    not take the awaited result in the moment between the await's wake-up and its take."""
    q = make_queue(capacity=64, slot_bytes=16)

    async def main():
        async with AsyncQueue(q) as aq:
            task, got = collect_completions(aq)
            for i in range(40):
                with q.paused():
                    mid = await aq.enqueue(b"%d" % i)
                    awaited = asyncio.ensure_future(aq.result(mid, timeout=10))
                    await asyncio.sleep(0)
                assert await awaited == b"%d" % i
            task.cancel()
            assert got == []

    run(main())


@pytest.mark.parametrize("call", ["enqueue", "result"])
def test_a_cancel_after_close_failed_the_await_ends_the_task_cancelled(make_queue, call):
    """A task cancelled (Ctrl-C in asyncio.run, a TaskGroup) just after close() failed its await
    ends cancelled, as a task should, not with QueueClosed: asyncio.run logs a task that ends with
    an exception while it cancels the others as 'unhandled exception'."""
    q = make_queue(capacity=4, slot_bytes=16)

    async def main():
        aq = AsyncQueue(q)
        with q.paused():
            await aq.enqueue_many([b"x"] * 4)
            task = asyncio.ensure_future(
                aq.enqueue(b"y", timeout=30) if call == "enqueue" else aq.result(0, timeout=30)
            )
            await asyncio.sleep(0.01)
            aq.close()  # fails the await, from the loop's next callback
            asyncio.get_running_loop().call_soon(task.cancel)  # the callback after it
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        assert q.wait_result(0, 10) == b"x"

    run(main())


def test_an_await_whose_result_another_consumer_took_raises_unknown_message(make_queue):
    """result() awaiting a msg_id that a blocking consumer takes, its slot then reused before the
    poller looks, raises UnknownMessage (it used to wait for ever: the header never showed it)."""
    q = make_queue(capacity=4, slot_bytes=16)

    async def main():
        async with AsyncQueue(q, spin_s=0, max_sleep_s=1.0, idle_sleep_s=1.0) as aq:
            with q.paused():
                mid = await aq.enqueue(b"a")
                task = asyncio.ensure_future(aq.result(mid))
                await asyncio.sleep(0.5)  # the poller's pauses have grown past what follows
                q.resume()
                assert q.wait_result(mid, 10) == b"a"  # the loop is blocked meanwhile
                for _ in range(4):
                    q.wait_result(q.enqueue(b"b"), 10)
            with pytest.raises(UnknownMessage, match="taken by another consumer"):
                await asyncio.wait_for(task, 10)

    run(main())
