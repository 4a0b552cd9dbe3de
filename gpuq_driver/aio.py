"""asyncio front end of a GpuQueue: await results and free slots without blocking the event loop.

    from gpuq_driver.aio import AsyncQueue

    async with AsyncQueue(q) as aq:                  # q: a started GpuQueue (not closed by aq)
        msg_id = await aq.enqueue(b"payload")        # waits for a free slot without blocking the loop
        result = await aq.result(msg_id)             # bytes; many tasks may await at once
        first = await aq.enqueue_many(rows)          # the batch calls too
        data, lengths = await aq.take_results(first, len(rows))
        async for msg_id, result in aq.completions():  # everything finishing, in msg_id order
            ...

The event loop thread never spins: it makes the same non-blocking calls as the blocking API (an
enqueue is a few stores; a take a copy) and otherwise awaits futures.  Such a call that finds
nothing sleeps(0) (~57 µs) only while another thread of the queue needs the GIL back (a launch in
flight, a producer waiting for a slot or copying a batch, the lease keeper's look:
``GpuQueue._give_way``).  One background *poller* thread per AsyncQueue watches the mapped result
headers for what is awaited (one vectorised compare of every awaited msg_id per look) and wakes the
awaiting loops with ``loop.call_soon_threadsafe``; the awaiting task then takes the result itself, in the step that
returns it, so a cancelled or timed-out await never loses it (it stays in the queue, takeable).
The poller looks back to back (yielding the GIL) for ``spin_s`` after the last progress, then
sleeps with growing pauses up to ``max_sleep_s`` while messages are outstanding and
``idle_sleep_s`` when none is (or the queue is paused); with nothing awaited at all it blocks on an
event (no CPU).  An await registered from the loop wakes it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import weakref

import numpy as np

from .errors import (
    ConfigError,
    GpuqError,
    KernelStopped,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
    check_instance,
    check_number,
    check_seconds,
)


def _wake(fut) -> None:
    if not fut.done():
        fut.set_result(True)


def _expire(fut) -> None:
    if not fut.done():
        fut.set_result(False)


async def _woken(fut, deadline) -> bool:
    """Await ``fut`` (set by ``_wake``, or failed by ``close()``) until ``deadline`` (monotonic
    seconds; None = no limit): True if woken, False at the deadline.  A timer on the loop rather
    than ``asyncio.wait_for``, whose 3.11 version, cancelled once ``fut`` is done, returns or raises
    ``fut``'s outcome instead of the cancellation (a task cancelled by Ctrl-C as ``close()`` failed
    its await then ended with QueueClosed, which ``asyncio.run`` logs as unhandled)."""
    if deadline is None:
        return await fut
    loop = fut.get_loop()
    timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _fail(fut, exc) -> None:
    if not fut.done():
        fut.set_exception(exc)


class AsyncQueue:
    """asyncio calls over ``queue`` (a started GpuQueue), served by one poller thread (see the module).

    spin_s:       seconds the poller keeps looking back to back after the last progress (default
                  200 µs; a round trip is a few µs on the GPU).
    max_sleep_s:  cap of its sleeps while messages are outstanding (default 1 ms).
    idle_sleep_s: cap while nothing is outstanding (or the queue is paused) but something is
                  awaited (a ``completions()`` iterator, a wait for room) (default 5 ms): how late a
                  message enqueued by a blocking producer, not through this object, may be noticed.

    Thread safety: the coroutines may run on any number of event loops in any threads; each
    loop's futures are woken on that loop.  ``close()`` (or ``async with``) stops the poller and
    fails what still awaits with QueueClosed; the GpuQueue itself is left open.
    """

    def __init__(self, queue, *, spin_s: float = 200e-6, max_sleep_s: float = 1e-3, idle_sleep_s: float = 5e-3):
        from .queue import GpuQueue

        self.queue = check_instance("queue", queue, GpuQueue, "a GpuQueue")
        self.spin_s = check_number("spin_s", spin_s, 0.0, 1.0, " of seconds")
        self.max_sleep_s = check_number("max_sleep_s", max_sleep_s, 1e-6, 1.0, " of seconds")
        self.idle_sleep_s = check_number("idle_sleep_s", idle_sleep_s, 1e-6, 10.0, " of seconds")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._sleeping = False
        self._waiting: dict[int, asyncio.Future] = {}  # msg_id -> the future of its await
        self._dispatched: set[int] = set()  # msg_ids handed to their loop, not yet delivered there
        self._conds: dict[int, tuple] = {}  # token -> (future, predicate): wake when predicate(q, rings)
        self._tokens = itertools.count()
        self._version = 0  # bumped whenever _waiting or _dispatched change
        self._closed = False
        self._thread: threading.Thread | None = None
        self.looks = 0  # the poller's looks at the headers (for measurements)

    # -- the coroutines ----------------------------------------------------------------------------

    async def enqueue(self, payload, timeout: float | None = None) -> int:
        """``queue.enqueue`` without blocking the loop: a full ring is awaited, not slept on.
        timeout: seconds (None = ``config.enqueue_timeout_s``).  Raises as ``GpuQueue.enqueue``."""
        self._check_open()
        q = self.queue
        deadline = self._deadline(q.config.enqueue_timeout_s if timeout is None else timeout)
        while True:
            try:
                return q.enqueue(payload, timeout=0)
            except QueueFull:
                await self._room(1, deadline, timeout, False)

    async def enqueue_many(self, payloads, lengths=None, timeout: float | None = None) -> int:
        """``queue.enqueue_many`` without blocking the loop (all or nothing, as there).
        Raises as ``GpuQueue.enqueue_many``."""
        self._check_open()
        q = self.queue
        deadline = self._deadline(q.config.enqueue_timeout_s if timeout is None else timeout)
        while True:
            try:
                return q.enqueue_many(payloads, lengths, timeout=0)
            except QueueFull:
                n = len(payloads) if lengths is None else len(lengths)
                await self._room(n, deadline, timeout, True)

    async def enqueue_device(self, array, lengths=None, stream=None, timeout: float | None = None) -> int:
        """``queue.enqueue_device`` with a full ring awaited, not slept on (all or nothing, as
        there).  The call itself still waits, on the loop's thread, for its own device-to-device
        copy (one ``cuEventSynchronize`` of that copy: microseconds for rows already in VRAM).
        Raises as ``GpuQueue.enqueue_device``."""
        self._check_open()
        q = self.queue
        deadline = self._deadline(q.config.enqueue_timeout_s if timeout is None else timeout)
        while True:
            try:
                return q.enqueue_device(array, lengths, stream=stream, timeout=0)
            except QueueFull:
                await self._room(len(array) if lengths is None else len(lengths), deadline, timeout, True)

    async def result(self, msg_id: int, timeout: float | None = None) -> bytes:
        """Await ``msg_id``'s result and take it (``wait_result``'s async twin).  timeout: seconds,
        None (default) = as long as the kernel runs.  On timeout or cancellation the result stays
        in the queue, takeable.  Raises ResultTimeout, KernelStopped, UnknownMessage, ProtocolError,
        MessageFailed (the plugin failed it: taken), QueueClosed, TypeError, GpuqError (the same
        msg_id already awaited)."""
        q = self.queue
        q._slot(msg_id)  # TypeError unless an int
        self._check_open()
        deadline = self._deadline(timeout)
        r = q.try_dequeue_result(msg_id)
        if r is not None:
            return r
        if not q._tail <= msg_id < q._head or q._taken[msg_id & q._mask] == msg_id:
            raise UnknownMessage(q._unknown(msg_id))
        msg_id = int(msg_id)
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise QueueClosed("the AsyncQueue is closed")
            if msg_id in self._waiting:
                raise GpuqError(f"msg_id {msg_id} is already awaited")
            self._waiting[msg_id] = fut
            self._version += 1
        self._start()
        try:
            woken = await _woken(fut, deadline)
            # Take it here, in this task's own step, with no await between the take and the return,
            # and while still registered (completions() leaves it alone): a cancel landing after the
            # wake-up (asyncio.timeout(), wait_for on 3.12+) leaves the result in the queue.
            r = q.try_dequeue_result(msg_id) if woken else None
        finally:
            with self._lock:
                if self._waiting.get(msg_id) is fut:
                    del self._waiting[msg_id]
                    self._dispatched.discard(msg_id)
                    self._version += 1
        if r is not None:
            return r
        if not woken:
            why = " (the queue is paused: resume() lets the kernel process it)" if q._leases.paused else ""
            raise ResultTimeout(f"no result for msg_id {msg_id} within {timeout} s{why}")
        if self._closed:  # woken without a result: say why
            raise QueueClosed("the AsyncQueue was closed")
        q._keep_serving()  # raises where the kernel cannot be launched again
        if q._kernel.exited():
            raise KernelStopped(f"the kernel has stopped; msg_id {msg_id} was not processed and never will be")
        raise UnknownMessage(f"msg_id {msg_id} was taken by another consumer")

    async def take_results(self, first: int, n: int, timeout: float | None = None, **kwargs):
        """``queue.take_results(first, n, **kwargs)`` once all are done, awaited (timeout: seconds,
        None = as long as the kernel runs; past it ResultTimeout, nothing taken).  Raises as there."""
        return await self._range(self.queue.take_results, False, first, n, timeout, kwargs)

    async def view_results(self, first: int, n: int, timeout: float | None = None, **kwargs):
        """``queue.view_results(first, n, **kwargs)`` once all are done, awaited.  Raises as there."""
        return await self._range(self.queue.view_results, True, first, n, timeout, kwargs)

    async def view_results_device(self, first: int, n: int, timeout: float | None = None, **kwargs):
        """``queue.view_results_device(first, n, **kwargs)`` once all are done, awaited (a
        DeviceResultView; ``result_memory="device"``).  Raises as there."""
        return await self._range(self.queue.view_results_device, True, first, n, timeout, kwargs)

    async def completions(self, errors: str = "raise"):
        """An async iterator of ``(msg_id, result)`` for every message of the queue as it
        finishes, in msg_id order, each taken (like ``poll_completions`` + ``try_dequeue_result``;
        results someone awaits with ``result()`` are left to them).  Ends once the queue has shut
        down and every result has been yielded, or the queue or this object is closed.  A result
        the device flagged raises ProtocolError, or MessageFailed where the plugin failed it
        (either ends the iteration); ``errors="return"`` yields the exception in its place instead."""
        if errors not in ("raise", "return"):
            raise ConfigError(f"errors={errors!r} must be 'raise' or 'return'")
        q = self.queue
        final = False
        while not self._closed:
            try:
                ids = q.poll_completions()
            except QueueClosed:
                return
            for mid in ids:
                if mid in self._waiting:
                    continue
                try:
                    r = q.try_dequeue_result(mid)
                except QueueClosed:
                    return
                except GpuqError as exc:
                    if errors == "raise":
                        raise
                    r = exc
                if r is not None:
                    yield mid, r
            if ids:
                continue
            if q._stop_mode is not None and q._kernel.exited():  # nothing more will finish
                if final:
                    return
                final = True  # one more poll: what finished last is visible now
                continue
            q._keep_serving()  # raises where the kernel cannot be launched again
            try:
                await self._until(_next_done, None)
            except QueueClosed:  # this AsyncQueue was closed: the iteration ends
                return

    # -- helpers of the coroutines -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed("the AsyncQueue is closed")

    @staticmethod
    def _deadline(timeout) -> float | None:
        if timeout is None:
            return None
        t = check_seconds("timeout", timeout)
        return None if math.isinf(t) else time.monotonic() + t

    async def _room(self, n: int, deadline, timeout, batch: bool) -> None:
        q = self.queue
        q._keep_serving()  # raises where the kernel cannot be launched again
        if q._kernel.exited() and q._accepting:
            raise KernelStopped("the persistent kernel has stopped; the queue cannot make room")
        if deadline is not None and time.monotonic() >= deadline:  # the blocking calls' message
            waited = q.config.enqueue_timeout_s if timeout is None else timeout
            seq = q._head
            raise QueueFull(q._room_message(seq, n, waited) if batch else q._full_message(seq, waited))
        need = min(n, q._cap)
        await self._until(lambda q, rings: q._head + need <= q._limit or not q._accepting, deadline)

    async def _range(self, call, view: bool, first, n, timeout, kwargs):
        self._check_open()
        q = self.queue
        deadline = self._deadline(timeout)
        while True:
            try:
                return call(first, n, timeout=0, **kwargs)
            except ResultTimeout:
                q._keep_serving()  # raises where the kernel cannot be launched again
                if q._kernel.exited():  # the sync call's own KernelStopped check needs a wait
                    return call(first, n, timeout=1e-3, **kwargs)
                if deadline is not None and time.monotonic() >= deadline:
                    why = " (the queue is paused: resume() lets the kernel process it)" if q._leases.paused else ""
                    raise ResultTimeout(
                        f"msg_ids {first}..{first + n - 1} were not all done within {timeout} s{why}; nothing was taken"
                    ) from None
            count = min(n, q._cap - (first & q._mask)) if view else min(n, q._cap)
            ids = np.arange(first, first + count, dtype=np.uint64)
            slots = ids & np.uint64(q._mask)
            await self._until(lambda q, rings, s=slots, i=ids: bool((rings.res_ids[s] == i).all()), deadline)

    async def _until(self, predicate, deadline) -> None:
        """Await until ``predicate(queue, rings)`` (run by the poller under the consumer lock) is
        true, the kernel stops, the queue closes, or ``deadline`` passes (then return anyway: the
        caller looks again and decides)."""
        fut = asyncio.get_running_loop().create_future()
        token = next(self._tokens)
        with self._lock:
            if self._closed:
                raise QueueClosed("the AsyncQueue is closed")
            self._conds[token] = (fut, predicate)
            self._version += 1
        self._start()
        try:
            await _woken(fut, deadline)
        finally:
            with self._lock:
                if self._conds.pop(token, None) is not None:
                    self._version += 1

    def _deliver(self, ids: list[int]) -> None:
        """In the loop's thread: wake each await still there; it takes its result itself (a wake-up
        carries no data, so an await cancelled after it loses nothing) and then unregisters."""
        for mid in ids:
            fut = self._waiting.get(mid)
            if fut is not None and fut.get_loop() is asyncio.get_running_loop():
                _wake(fut)

    # -- the poller --------------------------------------------------------------------------------

    def _start(self) -> None:
        thread = self._thread
        if thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=_poll, args=(weakref.ref(self),), name="gpuq-aio-poller", daemon=True
                    )
                    self._thread.start()
        elif self._sleeping:
            self._wake.set()

    def close(self) -> None:
        """Stop the poller and fail every await still pending with QueueClosed (their results stay
        in the queue).  Idempotent; the GpuQueue is not closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futs = list(self._waiting.values()) + [f for f, _ in self._conds.values()]
        self._wake.set()
        for fut in futs:
            try:
                fut.get_loop().call_soon_threadsafe(_fail, fut, QueueClosed("the AsyncQueue was closed"))
            except RuntimeError:  # its loop is closed
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AsyncQueue over {self.queue!r}: {len(self._waiting)} awaited{' closed' if self._closed else ''}>"


def _next_done(q, rings) -> bool:
    """The completions() iterator's condition: the next result poll_completions would report is done."""
    c = max(q._polled, q._tail)
    return c < q._head and rings.res_ids[c & q._mask] == c


def _poll(ref) -> None:
    """The poller thread (holds its AsyncQueue weakly: a dropped one ends it)."""
    ids = np.zeros(0, np.uint64)
    version = -1
    last = time.perf_counter()
    pause = 0.0
    while True:
        self = ref()
        if self is None:
            return
        with self._lock:
            if self._closed:
                return
            if self._version != version:
                version = self._version
                ids = np.fromiter(
                    (m for m in self._waiting if m not in self._dispatched),
                    np.uint64,
                    len(self._waiting) - len(self._dispatched),
                )
            conds = list(self._conds.items())
        q = self.queue
        if not ids.size and not conds:
            _sleep(self, version, 0.5)  # nothing awaited: no CPU (0.5 s: to notice a dropped AsyncQueue)
            last, pause = time.perf_counter(), 0.0
            continue
        self.looks += 1
        done, fired = None, []
        with q._clock:  # the memory cannot be freed while it is held (close forgets it under this lock)
            stopped = q._res_hdr is None
            if not stopped:
                rings = q._rings()
                if ids.size:
                    # below the tail: taken by another consumer, its slot maybe reused already
                    hit = (rings.res_ids[ids & np.uint64(q._mask)] == ids) | (ids < q._tail)
                    if hit.any():
                        done = ids[hit]
                for token, (_, predicate) in conds:
                    if predicate(q, rings):
                        fired.append(token)
        now = time.perf_counter()
        if done is None and not fired and not stopped and now - last > self.spin_s:
            try:
                q._keep_serving()  # messages wait and no lease runs: launch one, as wait_result does
                stopped = q._kernel.exited()
            except GpuqError:
                stopped = True
        if stopped:  # every await is woken and finds out through the blocking calls
            done, fired = ids, [token for token, _ in conds]
        if done is not None and done.size:
            _dispatch(self, done)
        for token in fired:
            with self._lock:
                entry = self._conds.pop(token, None)
                self._version += 1
            if entry is not None:
                try:
                    entry[0].get_loop().call_soon_threadsafe(_wake, entry[0])
                except RuntimeError:  # its loop is closed
                    pass
        if (done is not None and done.size) or fired:
            last, pause = now, 0.0
            if stopped:  # the woken tasks look once more; do not spin on a stopped queue
                _sleep(self, -1, 1e-3)
            continue
        if now - last <= self.spin_s:
            del self
            time.sleep(0)  # let the loop threads have the GIL
            continue
        busy = (ids.size > 0 or q._head > q._tail + q._taken_ahead) and not q._leases.paused
        pause = min(self.max_sleep_s if busy else self.idle_sleep_s, pause * 2 or 20e-6)
        _sleep(self, version, pause)


def _sleep(self: AsyncQueue, version: int, seconds: float) -> None:
    """Sleep up to ``seconds`` unless something was registered since ``version`` was read; an
    await registered meanwhile sees ``_sleeping`` and sets the event (the GIL orders both)."""
    self._sleeping = True
    with self._lock:
        changed = self._version != version or self._closed
    if not changed:
        wake = self._wake
        wake.wait(seconds)
        wake.clear()
    self._sleeping = False


def _dispatch(self: AsyncQueue, done: np.ndarray) -> None:
    by_loop: dict = {}
    with self._lock:
        for m in done.tolist():
            fut = self._waiting.get(m)
            if fut is None or m in self._dispatched:
                continue
            self._dispatched.add(m)
            by_loop.setdefault(fut.get_loop(), []).append(m)
        self._version += 1
    for loop, ms in by_loop.items():
        try:
            loop.call_soon_threadsafe(self._deliver, ms)
        except RuntimeError:  # the loop is closed: nobody will take these
            with self._lock:
                for m in ms:
                    self._waiting.pop(m, None)
                    self._dispatched.discard(m)
                self._version += 1


__all__ = ["AsyncQueue"]
