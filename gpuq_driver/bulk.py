"""GpuQueue's batch calls: many messages per Python call (``enqueue_many``, ``reserve``/``commit``,
``take_results``, ``view_results``, ``take_ready``, ``free_slots``).

One message per Python call costs ~1 µs of interpreter time, which caps one thread near a million
messages a second whatever PCIe carries.  These calls do the same protocol for a whole batch with
NumPy over the same mapped memory (device_src/gpuq_layout.cuh, "Slot life"): one copy of the
payloads into the request ring per contiguous run of slots (two where the batch wraps at the
ring's end), the request headers ``len | READY << 32`` and ``msg_id`` written as two strided
stores per run, then **one** doorbell store for the batch; results are checked (every result
header's ``msg_id`` word against its expected msg_id, vectorised) and copied out, or lent as a
read-only view of the result ring, in one call.

Memory ordering is the per-message path's (docs/design.md): on x86 the CPU's stores become visible
in program order, so the payload bytes (NumPy copies: plain stores, or glibc's non-temporal copy,
which ends with an ``sfence``), then the headers, then the doorbell reach the GPU in that order;
the device acquires the doorbell before it reads a slot.  On the result side the host reads each
``msg_id`` word before it reads that slot's header and data (x86 does not reorder loads with
loads), the device having written data, header, then ``msg_id`` with a system-scope release.

The methods live in :class:`BulkCalls`, a base class of GpuQueue, and use its producer state
(``_plock``, ``_head``, ``_limit``) and consumer state (``_clock``, ``_tail``, ``_taken``) exactly as
``enqueue`` and ``try_dequeue_result`` do, so batch and single calls mix freely on one queue.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref

import numpy as np

from .batch import FAILED
from .errors import (
    ConfigError,
    GpuqError,
    KernelStopped,
    MessageFailed,
    PayloadError,
    PayloadTypeError,
    ProtocolError,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
    check_int,
    check_seconds,
)
from .layout import DONE, ERR_MASK, ERR_SHIFT, ERROR_NAMES, FAIL_CODE_SHIFT, NO_MSG, READY, RESULT_FAILED
from .payload import byte_view, byte_views, lengths_array

_READY_WORD = np.uint64(READY << 32)
_MASK_COPY_MAX = 2048  # packed payloads up to this long are scattered with one masked NumPy copy
_VIEW_CALLS = {"view": "view_results", "device": "view_results_device"}  # the call of each lending mode


class _Rings:
    """NumPy views of one queue's mapped rings (made once, on the first batch call)."""

    __slots__ = ("req_hdr", "res_hdr", "res_hdr32", "req_data", "res_data", "res_ids", "taken")

    def __init__(self, q):
        cap, sb = q._cap, q._sb
        self.req_hdr = np.frombuffer(q._req_hdr, np.uint64).reshape(cap, 2)  # [s, 0] len|flags<<32, [s, 1] msg_id
        self.res_hdr = np.frombuffer(q._res_hdr, np.uint64).reshape(cap, 2)
        self.res_ids = self.res_hdr[:, 1]
        self.res_hdr32 = self.res_hdr.view(np.uint32)  # [s, 0] len, [s, 1] flags (x86: little-endian)
        self.req_data = np.frombuffer(q._req_data, np.uint8).reshape(cap, sb)
        if q.config.result_memory == "device":  # in VRAM: rows copied into the staging buffer when read
            self.res_data = q._res_data.rows(cap, sb)
        else:
            self.res_data = np.frombuffer(q._res_data, np.uint8).reshape(cap, sb)
        self.taken = np.frombuffer(q._taken, np.uint64)  # GpuQueue._taken: msg_id last taken per slot


def _segments(first: int, n: int, cap: int) -> list[tuple[int, int, int]]:
    """The ring runs of msg_ids first .. first + n - 1: [(first slot, index in the batch, count)],
    one run, or two where the batch wraps at the ring's end."""
    s0 = first & (cap - 1)
    k = min(n, cap - s0)
    return [(s0, 0, k)] if k == n else [(s0, 0, k), (0, k, n - k)]


def _batch_input(payloads, lengths, sb: int):
    """Check a batch and bring it to one of two forms, before anything is written:
    ("rows", [n, width] uint8, lengths uint32[n] or None) or ("packed", 1-D uint8, lengths uint32[n])."""
    if lengths is None:
        if isinstance(payloads, (list, tuple)):  # a convenience: a list of bytes-like messages
            views = byte_views(payloads, "enqueue()")
            lens = lengths_array([len(v) if type(v) is bytes else v.nbytes for v in views], None, sb, "slot_bytes")
            return "packed", np.frombuffer(b"".join(views), np.uint8), lens
        if isinstance(payloads, (bytes, bytearray, memoryview, str)):
            raise PayloadTypeError(
                f"payloads is one {type(payloads).__name__} object: pass lengths= to split a packed buffer "
                "into messages, a 2-D uint8 array [n, size], or a list of messages"
            )
        if not isinstance(payloads, np.ndarray):
            try:
                payloads = np.asarray(memoryview(payloads))
            except (TypeError, ValueError):
                raise PayloadTypeError(
                    "payloads must be a 2-D uint8 array [n, size], a list of messages, or a packed bytes-like "
                    f"buffer with lengths=, not {type(payloads).__name__}"
                ) from None
        if payloads.ndim != 2:
            raise PayloadTypeError(
                f"payloads must be 2-D [n, size] (one message per row), not {payloads.ndim}-D of shape "
                f"{payloads.shape}; for a packed 1-D buffer pass lengths="
            )
        if payloads.dtype != np.uint8:
            raise PayloadTypeError(f"payloads must have dtype uint8, not {payloads.dtype} (use .view(np.uint8))")
        if payloads.shape[1] > sb:
            raise PayloadError(
                f"payloads rows are {payloads.shape[1]} bytes; slot_bytes is {sb} (the limit per message)"
            )
        return "rows", payloads, None
    if isinstance(payloads, (list, tuple)):
        raise PayloadTypeError(
            "payloads is a list of messages, which takes no lengths= (each message has its own size); "
            "lengths= goes with a packed bytes-like buffer or a 2-D uint8 array [n, size]"
        )
    if isinstance(payloads, np.ndarray) and payloads.ndim == 2:
        if payloads.dtype != np.uint8:
            raise PayloadTypeError(f"payloads must have dtype uint8, not {payloads.dtype} (use .view(np.uint8))")
        width = payloads.shape[1]
        lens = lengths_array(lengths, payloads.shape[0], min(width, sb), "slot_bytes" if width >= sb else "the row")
        return "rows", payloads[:, : min(width, sb)], lens
    flat = np.frombuffer(byte_view(payloads, "payloads"), np.uint8)
    lens = lengths_array(lengths, None, sb, "slot_bytes")
    total = int(lens.sum(dtype=np.int64))
    if total != flat.size:
        raise PayloadError(f"lengths add up to {total} bytes; the packed payloads buffer has {flat.size}")
    return "packed", flat, lens


def _scatter_packed(ring: np.ndarray, s0: int, flat: np.ndarray, lens: np.ndarray) -> None:
    """Copy packed messages (``flat``, sizes ``lens``) into ring rows s0, s0 + 1, ...: one masked
    NumPy copy for short messages, one slice copy per message for long ones."""
    n = len(lens)
    if n == 0:
        return
    width = int(lens.max())
    if width == 0:
        return
    if int(lens.min()) == width:  # equal sizes: a plain 2-D copy
        ring[s0 : s0 + n, :width] = flat.reshape(n, width)
    elif width <= _MASK_COPY_MAX:
        ring[s0 : s0 + n, :width][np.arange(width, dtype=np.uint32) < lens[:, None]] = flat
    else:
        pos = 0
        for i, m in enumerate(lens.tolist()):
            ring[s0 + i, :m] = flat[pos : pos + m]
            pos += m


def _gather_packed(rows: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The first ``lens[i]`` bytes of each row of ``rows``, back to back (a new 1-D uint8 array)."""
    n = len(lens)
    width = int(lens.max()) if n else 0
    if width == 0:
        return np.zeros(0, np.uint8)
    if int(lens.min()) == width:
        return rows[:, :width].reshape(-1).copy()
    return rows[:, :width][np.arange(width, dtype=np.uint32) < lens[:, None]]


def _first_missing(rings: _Rings, ids: np.ndarray, segs) -> int:
    """Index of the first msg_id of ``ids`` (in ring runs ``segs``) whose result is not done; -1 if all are."""
    for s0, i0, k in segs:
        done = rings.res_ids[s0 : s0 + k] == ids[i0 : i0 + k]
        if not done.all():
            return i0 + int(np.argmin(done))
    return -1


def _decode(hdr32: np.ndarray, segs, want_flags: bool):
    """The result headers of ring runs ``segs`` (``hdr32``: the result header ring as uint32
    [capacity, 4]: len, flags, msg_id) -> (lengths uint32 with FAILED where flagged, flagged bool,
    flags uint32: a copy, made only if ``want_flags`` or some result is flagged, else None)."""
    if len(segs) == 1:
        s0, _, k = segs[0]
        lens, bad = hdr32[s0 : s0 + k, 0].copy(), hdr32[s0 : s0 + k, 1] != DONE
    else:
        lens = np.concatenate([hdr32[s0 : s0 + k, 0] for s0, _, k in segs])
        bad = np.concatenate([hdr32[s0 : s0 + k, 1] != DONE for s0, _, k in segs])
    flagged = bool(bad.any())
    flags = None
    if want_flags or flagged:
        flags = np.concatenate([hdr32[s0 : s0 + k, 1] for s0, _, k in segs])
    if flagged:
        lens[bad] = FAILED
    return lens, bad, flags


def _flag_name(flags: int) -> str:
    """What a result's flags word says: a protocol error's name (bits 8..14), or, where bit 15
    (RESULT_FAILED) is set, the plugin's own failure with its code in the top 16 bits."""
    if flags & RESULT_FAILED:
        return f"a failure of the plugin (code {flags >> FAIL_CODE_SHIFT})"
    code = (flags >> ERR_SHIFT) & ERR_MASK
    return ERROR_NAMES.get(code, f"flags 0x{flags:x}")


def _bulk_failure(first: int, flags: np.ndarray, bad: np.ndarray, data, lens, plugin: str = "") -> GpuqError:
    """The error a batch take raises (errors="raise") when some of its results are flagged.  All of
    them were taken (their slots are free).  MessageFailed (naming the first, with ``.failures``
    {msg_id: code}) when every flagged one is the plugin's own failure (GPUQ_FAIL), else
    ProtocolError naming the first protocol error.  Either carries ``.results`` (data, lengths) of
    the whole range, FAILED where flagged, ``.msg_ids`` the flagged msg_ids, ``.flags`` their
    flags words."""
    idx = np.flatnonzero(bad)
    fl = flags[idx]
    protocol = (fl & (ERR_MASK << ERR_SHIFT)) != 0
    if not protocol.any():
        failures = {first + int(j): int(f) >> FAIL_CODE_SHIFT for j, f in zip(idx, fl)}
        i = int(idx[0])
        exc: GpuqError = MessageFailed(first + i, failures[first + i], plugin, failures=failures)
    else:
        i = int(idx[int(np.flatnonzero(protocol)[0])])
        exc = ProtocolError(
            f"msg_id {first + i}: device reported {_flag_name(int(flags[i]))} ({len(idx)} of the {len(bad)} "
            f"results from msg_id {first} flagged; all were taken: .results holds (data, lengths), FAILED "
            "where flagged)"
        )
    exc.results = (data, lens)
    exc.msg_ids = [first + int(j) for j in idx]
    exc.flags = fl
    return exc


def acquire_noted(held: list, lock, blocking: bool = True, timeout: float = -1) -> None:
    """``lock.acquire(blocking, timeout)``, a success noted in ``held`` by C code (``filter``,
    ``map``, ``list.extend``): CPython runs signal handlers as a call returns, so after
    ``lock.acquire(); try:`` a KeyboardInterrupt can come with the lock taken and no ``finally``
    to release it.  Call it inside the ``try`` and release in ``finally: if held:``."""
    held.extend(filter(None, map(lock.acquire, (blocking,), (timeout,))))


class _HeldLock:
    """Stands in for ``GpuQueue._plock`` while a Reservation holds the producer lock: other threads
    wait for the real lock as before; the thread that reserved gets GpuqError instead of a deadlock."""

    __slots__ = ("real", "owner")

    def __init__(self, real, owner: int):
        self.real, self.owner = real, owner

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.get_ident() == self.owner:
            if blocking and timeout < 0:
                self.refuse_owner()
            return False
        return self.real.acquire(blocking, timeout)

    def refuse_owner(self) -> None:
        """GpuqError in the thread that holds the reservation (it would wait for itself)."""
        if threading.get_ident() == self.owner:
            raise GpuqError(
                "this thread holds an open reservation (reserve()): commit() or cancel() it before "
                "enqueueing, reserving again or shutting down"
            )

    def release(self) -> None:
        self.real.release()

    def __enter__(self):
        self.refuse_owner()
        held: list = []  # not self.acquire(): a KeyboardInterrupt could come with the lock taken
        try:
            acquire_noted(held, self.real)
        except BaseException:
            if held:
                self.real.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.real.release()


class Reservation:
    """``n`` consecutive request slots claimed by :meth:`BulkCalls.reserve`, to fill in place.

    first:    the msg_id of row 0 (row i is msg_id ``first + i``).
    data:     ``[n, slot_bytes]`` uint8, a writable view of the request ring itself: write each
              message's bytes into its row (no copy is made at commit).
    lengths:  uint32[n], each message's size in bytes (0 .. slot_bytes); starts at slot_bytes.
    ``len(r)`` is n: at most what was asked for, never past the ring's end (see ``reserve``).

    ``commit(lengths=None, n=None)`` publishes the messages (one header store per run, one doorbell
    store); ``cancel()`` gives the slots back unpublished.  ``with q.reserve(n) as r:`` commits at
    the end of the block, or cancels if the block raised.  The reservation holds the queue's
    producer lock until then: other threads' enqueues wait, and the reserving thread's own
    ``enqueue``/``enqueue_many``/``reserve``/``shutdown`` raise GpuqError (its ``close()`` cancels
    the reservation; a commit after that raises QueueClosed).  Do not touch ``data``
    after commit or cancel (the slots belong to the device, then to later messages), nor after the
    queue is closed (the memory is freed).
    """

    __slots__ = ("_q", "_real", "first", "_data", "lengths", "_n", "_open", "_closed_by_queue", "_guard", "__weakref__")

    def __init__(self, q, real_lock, first: int, n: int, data: np.ndarray):
        self._q, self._real, self.first, self._n = q, real_lock, first, n
        self._data = data
        self.lengths = np.full(n, q._sb, np.uint32)
        self._open = False  # reserve() opens it last, with no call in between (see there)
        self._closed_by_queue = False  # cancelled by the reserving thread's close()
        # commit and cancel in two threads: one of them ends the reservation, the other finds it
        # ended (the producer lock is released once, never while the commit publishes)
        self._guard = threading.Lock()

    def __len__(self) -> int:
        return self._n

    @property
    def data(self) -> np.ndarray:
        """``[n, slot_bytes]`` uint8 view of the request slots; GpuqError once committed or cancelled,
        QueueClosed once the queue is closed (the memory is freed)."""
        if not self._open:
            raise GpuqError("the reservation is committed or cancelled: its slots are no longer yours")
        if self._q._req_hdr is None:
            raise QueueClosed("queue is closed: the reservation's slots are freed")
        return self._data

    @property
    def msg_ids(self) -> np.ndarray:
        """The msg_ids of the rows: ``first .. first + n - 1`` (uint64)."""
        return np.arange(self.first, self.first + self._n, dtype=np.uint64)

    @property
    def open(self) -> bool:
        """True until ``commit`` or ``cancel``."""
        return self._open

    def commit(self, lengths=None, n: int | None = None) -> int:
        """Publish the first ``n`` (default: all) messages and release the producer lock; return
        ``first``.  lengths: None (``self.lengths``), one int for every message, or an array of
        ``n`` sizes, each 0 .. slot_bytes.  Slots after ``n`` are given back unpublished.

        Raises GpuqError (already committed or cancelled), PayloadError / PayloadTypeError (bad
        lengths or n: the reservation stays open, fix and commit again, or cancel), QueueClosed
        (the queue was closed, by this thread while the reservation was open, or abandoned at
        interpreter exit: nothing is published), CudaError as ``enqueue`` (the messages are
        queued).  A ``cancel()`` in another thread waits for a commit under way, then does nothing."""
        with self._guard:
            return self._commit(lengths, n)

    def _commit(self, lengths, n) -> int:
        if not self._open:
            if self._closed_by_queue:
                raise QueueClosed("queue is closed: close() cancelled this open reservation, nothing was published")
            raise GpuqError("the reservation is already committed or cancelled")
        q = self._q
        count = self._n if n is None else check_int("n", n, 0, self._n)
        if lengths is None:
            lengths = np.asarray(self.lengths)[:count]
        elif isinstance(lengths, (int, np.integer)) and not isinstance(lengths, bool):
            lengths = np.full(count, lengths, dtype=np.int64)
        lens = lengths_array(
            lengths, count, q._sb, "slot_bytes", counted="the commit publishes {} messages (n= publishes fewer)"
        )
        doorbell = q._doorbell
        if doorbell is None:
            self._unlock()
            raise QueueClosed("queue is closed")
        if count:
            q._publish_locked(self.first, count, lens, 0)
        self._unlock()
        if count:
            q._after_batch()
        return self.first

    def cancel(self) -> None:
        """Give the slots back unpublished (nothing is enqueued); nothing once committed or cancelled
        (a commit under way in another thread is waited for)."""
        self._cancel(False)

    def _cancel(self, by_close: bool) -> None:
        with self._guard:
            if self._open:
                self._closed_by_queue = by_close
                self._unlock()

    def _unlock(self) -> None:
        self._open = False
        q = self._q
        q._reserved = 0
        q._reservation = None
        q._plock = self._real
        self._real.release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._open:
            if exc_type is None and self._closed_by_queue:  # the block closed the queue: no commit
                self.commit()  # raises QueueClosed
            return
        if exc_type is None:
            self.commit()
        else:
            self.cancel()

    def __del__(self):
        if getattr(self, "_open", False):
            try:
                self._unlock()
            except Exception:  # noqa: BLE001 - interpreter teardown
                return
            warnings.warn(
                f"a Reservation of msg_ids {self.first}..{self.first + self._n - 1} was dropped open: cancelled",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<Reservation msg_ids {self.first}..{self.first + self._n - 1} ({self._n}) {state}>"


def _release_soon(q, rec: list) -> None:
    """Free a held view's slots (record ``rec``) from a collector: never blocks, since it may run
    inside a call that holds the consumer lock.  Without the lock the record waits in
    ``q._dropped``, released under the lock by the next batch take, poll_completions, outstanding,
    stats, or a producer waiting for room."""
    held: list = []
    try:
        acquire_noted(held, q._clock, False)
        if held:
            q._release_view(rec)
        else:
            q._dropped.append(rec)
    finally:
        if held:
            q._clock.release()


class _Record(list):
    """``[first, n]`` of a result view held, as the queue keeps it (the queue keeps this, not the
    view, so that a dropped view is seen); ``call`` made the view, ``exported`` is set once a
    released DeviceResultView's slots wait for its exported arrays (QueueFull says so)."""

    __slots__ = ("call", "exported")

    def __init__(self, first: int, n: int, call: str):
        super().__init__((first, n))
        self.call, self.exported = call, False


class ResultView:
    """Results lent in place by :meth:`BulkCalls.view_results`: read them, then ``release()``.

    first:    the msg_id of row 0.
    data:     ``[n, slot_bytes]`` uint8, a read-only view of the result ring: row i holds msg_id
              ``first + i``'s result in its first ``lengths[i]`` bytes (the rest is unspecified).
    lengths:  uint32[n] result sizes; FAILED (0xFFFFFFFF) where the device flagged the message.
    flags:    uint32[n], each result header's flags word (DONE = 3 when all went well).
    ``len(v)`` is n: never past the ring's end (see ``view_results``).

    Until released, the slots stay taken by the view: nothing else takes these results and no new
    message reuses the slots (the ring frees in msg_id order, so a view held long holds up the
    producers).  ``with q.view_results(...) as v:`` releases at the end of the block.  Do not use
    ``data`` after release (the device writes later results there) or after the queue is closed.
    """

    __slots__ = ("_q", "first", "_data", "lengths", "flags", "_n", "_held", "_rec", "__weakref__")

    def __init__(self, q, first: int, data: np.ndarray, lengths: np.ndarray, flags: np.ndarray):
        self._q, self.first, self._data, self.lengths, self.flags = q, first, data, lengths, flags
        self._n = len(lengths)
        self._held = True
        self._rec = _Record(first, self._n, "view_results")

    def __len__(self) -> int:
        return self._n

    @property
    def data(self) -> np.ndarray:
        """``[n, slot_bytes]`` read-only view of the results; GpuqError once released, QueueClosed
        once the queue is closed (the memory is freed)."""
        if not self._held:
            raise GpuqError("the result view is released: its slots are no longer yours")
        if self._q._res_hdr is None:
            raise QueueClosed("queue is closed: the result view's slots are freed")
        return self._data

    @property
    def msg_ids(self) -> np.ndarray:
        """The msg_ids of the rows: ``first .. first + n - 1`` (uint64)."""
        return np.arange(self.first, self.first + self._n, dtype=np.uint64)

    @property
    def released(self) -> bool:
        return not self._held

    def release(self) -> None:
        """Free the slots (in msg_id order with every earlier result); idempotent; nothing after close()."""
        if self._held:
            self._held = False
            with self._q._clock:
                self._q._release_view(self._rec)

    def __enter__(self) -> ResultView:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_held", False):
            self._held = False
            try:
                _release_soon(self._q, self._rec)
            except Exception:  # noqa: BLE001 - interpreter teardown
                return
            warnings.warn(
                f"a ResultView of msg_ids {self.first}..{self.first + self._n - 1} was dropped unreleased: released",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        state = "held" if self._held else "released"
        return f"<ResultView msg_ids {self.first}..{self.first + self._n - 1} ({self._n}) {state}>"


class BulkCalls:
    """The batch calls of GpuQueue (a base class of it; see the module docstring)."""

    _rings_cache: _Rings | None = None
    _views: list | None = None  # [first, n] of each ResultView held, in msg_id order (a chain from the tail)
    _dropped: list | tuple = ()  # records of views dropped unreleased while the consumer lock was busy
    _reserved = 0  # slots claimed by an open Reservation
    # a weakref to that open Reservation: close() cancels its own thread's (a dropped one cancels itself)
    _reservation = None

    def _rings(self) -> _Rings:
        rings = self._rings_cache
        if rings is None:
            if self._res_hdr is None or self._req_hdr is None:
                raise QueueClosed("queue is closed")
            rings = self._rings_cache = _Rings(self)
        return rings

    def _after_batch(self) -> None:
        """After a doorbell store and the release of the producer lock (a full fence on x86): the
        relaunch handshake, as ``enqueue`` does it (lease.py)."""
        if self._leaving[0] >= self._leases.launches - self._lag:
            self._leases.after_publish()

    def _cancel_own_reservation(self) -> None:
        """close() from the thread that holds an open reservation: cancel it (nothing of it is
        published), so that close() can take the producer lock and free everything; else the
        lock's GpuqError would leave the kernel running and the device busy for the process."""
        lock, ref = self._plock, self._reservation
        r = ref() if ref is not None else None
        if type(lock) is _HeldLock and lock.owner == threading.get_ident() and r is not None and r._open:
            r._cancel(True)

    def _real_plock(self):
        lock = self._plock
        return lock.real if type(lock) is _HeldLock else lock

    # -- producer ------------------------------------------------------------------------------

    def free_slots(self) -> int:
        """Slots free for enqueueing now (0 after shutdown).  A snapshot: other producers may take
        them, consumers free more.  A batch of up to this many enqueued at once needs no wait.
        Finding none, sleeps(0) while a thread of the queue waits for the GIL (``_give_way``)."""
        if not self._accepting:
            return 0
        free = max(0, min(self._cap, self._limit - self._head - self._reserved))
        if not free:
            self._give_way()  # a loop waiting for room must not hold back the queue's threads
        return free

    def enqueue_many(self, payloads, lengths=None, timeout: float | None = None) -> int:
        """Enqueue a batch of messages with one doorbell store; return the first msg_id (the batch
        has msg_ids ``first .. first + n - 1``, in order).

        payloads, lengths (one of):
          * a 2-D uint8 array ``[n, size]`` (any strides), ``size <= slot_bytes``, lengths=None:
            n messages of ``size`` bytes, one per row;
          * the same with ``lengths`` (n ints, each <= size): message i is the first
            ``lengths[i]`` bytes of row i;
          * a 1-D bytes-like buffer (bytes, bytearray, memoryview, a numpy array) with ``lengths``
            (n ints, each 0 .. slot_bytes, adding up to its size): the messages back to back,
            the form of Track A's frames;
          * a list (or tuple) of bytes-like messages, lengths=None.
        timeout: seconds to wait until ``n`` slots are free; None = ``config.enqueue_timeout_s``;
          0 = fail at once.
        All or nothing: a batch that does not fit within the timeout, or any bad message, enqueues
        nothing.  n = 0 enqueues nothing and returns the next msg_id.

        Raises PayloadError (a message larger than slot_bytes or its row, lengths not matching the
        buffer, n > capacity: the error names the field and the limit), PayloadTypeError (not
        uint8, not 2-D, not bytes-like), ConfigError (a bad timeout), QueueFull (the ring did not
        have n free slots within the timeout; it says how many were free), QueueClosed, GpuqError
        (this thread holds an open reservation), KernelFault / PluginHung (a plugin faulted or
        hung: nothing more is accepted), KernelStopped, CudaError (as ``enqueue``).
        Thread safety: as ``enqueue`` (the producer lock, held for the copy).
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        kind, buf, lens = _batch_input(payloads, lengths, self._sb)
        n = buf.shape[0] if kind == "rows" else len(lens)
        if n > self._cap:
            raise PayloadError(f"a batch of {n} messages exceeds capacity={self._cap} (the most one call can enqueue)")
        with self._plock:
            seq = self._room_locked(n, timeout)
            if n == 0:
                return seq
            ring = self._rings().req_data
            segs = _segments(seq, n, self._cap)
            pos = 0
            self._producer_away = True  # NumPy lets go of the GIL for copies of 512 items and more: _give_way
            try:
                for s0, i0, k in segs:  # the payloads first ...
                    if kind == "rows":
                        ring[s0 : s0 + k, : buf.shape[1]] = buf[i0 : i0 + k]
                    else:
                        m = int(lens[i0 : i0 + k].sum(dtype=np.int64))
                        _scatter_packed(ring, s0, buf[pos : pos + m], lens[i0 : i0 + k])
                        pos += m
                self._publish_locked(seq, n, lens, 0 if lens is not None else buf.shape[1])  # ... headers, doorbell
            finally:
                self._producer_away = False
        self._after_batch()
        return seq

    def _room_locked(self, n: int, timeout: float | None) -> int:
        """The first msg_id of a batch of ``n`` (the producer lock is held), once its slots are free:
        waits up to ``timeout`` (QueueFull naming how many were free).  Raises QueueClosed, and
        KernelFault / PluginHung rather than QueueClosed after a fault or hang, as ``enqueue`` does."""
        seq = self._head
        if self._doorbell is None:
            raise QueueClosed("queue is closed")
        if seq + n > self._limit:  # ring too full, or shut down (_limit = -1)
            self._leases.check()
            if not self._accepting:
                raise QueueClosed("queue is shut down: enqueue is no longer accepted")
            if n:
                self._wait_for_room(seq, n, timeout)
        return seq

    def _publish_locked(self, seq: int, n: int, lens, width: int, word=_READY_WORD) -> None:
        """Publish msg_ids ``seq .. seq + n - 1``, their payloads in place (the producer lock is held):
        the request headers, two strided stores per ring run (``len | word``: each of ``lens``, or
        ``width`` for all when lens is None; the msg_ids), then **one** doorbell store."""
        hdr = self._rings().req_hdr
        words = word | np.uint64(width) if lens is None else lens.astype(np.uint64) | word
        ids = np.arange(seq, seq + n, dtype=np.uint64)
        for s0, i0, k in _segments(seq, n, self._cap):
            hdr[s0 : s0 + k, 0] = words if lens is None else words[i0 : i0 + k]
            hdr[s0 : s0 + k, 1] = ids[i0 : i0 + k]
        self._head = seq + n
        self._doorbell[0] = seq + n  # the doorbell, last

    def _wait_for_room(self, seq: int, n: int, timeout: float | None) -> None:
        """Wait (holding the producer lock) until msg_ids seq .. seq + n - 1 all have free slots."""
        try:
            self._wait_for_slot(seq + n - 1, timeout)
        except QueueFull:
            waited = self.config.enqueue_timeout_s if timeout is None else timeout
            raise QueueFull(self._room_message(seq, n, waited)) from None

    def _unknown(self, msg_id: int) -> str:
        """Why ``wait_result(msg_id)`` has nothing to wait for (UnknownMessage's text)."""
        for rec in self._views or ():
            if rec[0] <= msg_id < rec[0] + rec[1]:
                return f"msg_id {msg_id} is held by a result view ({rec.call}): its result is in the view"
        return f"msg_id {msg_id} was already taken or never issued"

    def _held_why(self) -> str:
        """What holds the oldest slot while a result view is held (the first view starts there)."""
        rec = self._views[0]
        if rec.exported:
            return (
                f"is held by arrays exported from a released {rec.call} view (CuPy or torch arrays, DLPack "
                "capsules, the DeviceArray itself): its slots free once they are all gone"
            )
        return f"is held by a result view ({rec.call}): release() it"

    def _room_message(self, seq: int, n: int, timeout: float) -> str:
        free = max(0, self._limit - seq)
        t = self._tail
        if self._views:
            why = self._held_why()
        elif self._res_hdr is not None and self._res_hdr[((t & self._mask) << 1) | 1] == t:
            why = f"has its result waiting: take it (take_results({t}, ...)); slots free in msg_id order"
        elif self._leases.paused:
            why = "is not processed yet: the queue is paused, resume() lets the kernel process it"
        else:
            why = "is not processed yet"
        return (
            f"ring full for a batch of {n} messages (waited {timeout} s): {free} of {self._cap} slots are "
            f"free, so {free} of them would fit; the next slot frees when msg_id {t} is taken, and msg_id {t} "
            f"{why} (outstanding() lists what holds the slots)"
        )

    def reserve(self, n: int, timeout: float | None = None) -> Reservation:
        """Claim up to ``n`` consecutive request slots to fill in place (zero copy), then
        ``commit()`` them: the claim/publish pattern of a ring buffer such as LMAX Disruptor's.

        Returns a :class:`Reservation` of ``min(n, capacity - head % capacity)`` slots: a
        reservation never crosses the ring's end, so that ``data`` is one ``[len(r), slot_bytes]``
        array; near the end it is shorter than asked (``len(r)`` says how long; reserve again for
        the rest).  With batches of a power of two that divides ``capacity`` and no single
        enqueues in between, it is always the full n.  Waits (holding the producer lock) until
        those slots are free: timeout seconds, None = ``config.enqueue_timeout_s``.

        Raises ConfigError (n not an int >= 1, a bad timeout), QueueFull (the slots did not free
        within the timeout; it says how many were free), QueueClosed, KernelFault / PluginHung
        (as ``enqueue_many``), KernelStopped, GpuqError (this thread already holds an open
        reservation).
        Thread safety: until commit or cancel the reservation holds the producer lock; other
        threads' enqueues and reservations wait for it, this thread's raise GpuqError.
        """
        n = check_int("n", n, 1)
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        lock = self._plock
        if type(lock) is _HeldLock:
            lock.refuse_owner()  # GpuqError if this thread holds the reservation
        real = self._real_plock()
        held: list = []
        try:
            acquire_noted(held, real)
            if self._doorbell is None:
                raise QueueClosed("queue is closed")
            seq = self._head
            k = min(n, self._cap - (seq & self._mask))
            if seq + k > self._limit:
                self._leases.check()  # a fault or hang: say so rather than QueueClosed, as enqueue does
                if not self._accepting:
                    raise QueueClosed("queue is shut down: enqueue is no longer accepted")
                self._wait_for_room(seq, k, timeout)
            s0 = seq & self._mask
            r = Reservation(self, real, seq, k, self._rings().req_data[s0 : s0 + k])  # not open: drops quietly
            ref, stand_in = weakref.ref(r), _HeldLock(real, threading.get_ident())
            # stores only from here (no call, so no KeyboardInterrupt): the reservation owns the lock
            r._open = True
            self._reserved, self._reservation, self._plock = k, ref, stand_in
        except BaseException:
            if held:
                real.release()
            raise
        return r

    # -- consumer ------------------------------------------------------------------------------

    def take_results(
        self, first: int, n: int, timeout: float | None = 1.0, *, out=None, packed: bool = False, errors="raise"
    ):
        """Wait for the results of msg_ids ``first .. first + n - 1``, take them all and return
        ``(data, lengths)`` (copies; every slot is freed on return).

        data:    ``[n, slot_bytes]`` uint8 (``out`` if given: a writable uint8 array of that
                 shape): row i holds msg_id first + i's result in its first lengths[i] bytes, the
                 rest of the row unspecified; with ``packed=True`` a 1-D uint8 array of the results
                 back to back (flagged ones count 0 bytes).
        lengths: uint32[n], result sizes in bytes; FAILED (0xFFFFFFFF) where the device flagged
                 the message (e.g. BAD_RESULT).
        timeout: seconds to wait for the last of them (None = as long as the kernel runs); past it
                 ResultTimeout names the first not done, and nothing is taken.
        errors:  "raise" (default): if the device flagged any of them, all are still taken (slots
                 freed) and ProtocolError names the first protocol error (MessageFailed the first
                 failure where every flagged one is the plugin's own, with ``.failures``), with
                 ``.results`` = (data, lengths), ``.msg_ids`` and ``.flags`` of the flagged ones;
                 "mark": no error, FAILED lengths.
        The range may wrap at the ring's end and may be taken out of order (a later range before
        an earlier one), as with ``try_dequeue_result``.  n = 0 returns empty arrays.

        Raises UnknownMessage (a KeyError: one of them was already taken, is held by a result
        view, or was never issued; nothing taken), ResultTimeout, KernelStopped (the kernel stopped
        and one of them will never be processed), ConfigError / TypeError (bad arguments),
        ProtocolError / MessageFailed (above), QueueClosed.
        Thread safety: as ``try_dequeue_result`` (the consumer lock, held for the copy).
        """
        first, n, timeout = self._range_args(first, n, timeout, errors)
        if out is not None:
            if packed:
                raise ConfigError("out= and packed=True cannot be combined")
            if not (
                isinstance(out, np.ndarray)
                and out.dtype == np.uint8
                and out.shape == (n, self._sb)
                and out.flags.writeable
            ):
                raise ConfigError(f"out must be a writable uint8 array of shape ({n}, {self._sb})")
        return self._take_range(first, n, timeout, "packed" if packed else "copy", out, errors)

    def view_results(self, first: int, n: int, timeout: float | None = 1.0, *, errors="raise") -> ResultView:
        """Wait for the results of msg_ids ``first ..``, and lend them in place: a
        :class:`ResultView` whose ``data`` is a read-only ``[len(v), slot_bytes]`` view of the
        result ring (no copy); ``release()`` it (or use ``with``) to free the slots.

        Covers ``min(n, capacity - first % capacity)`` results: a view never crosses the ring's
        end (``len(v)`` says how many; view again from ``first + len(v)`` for the rest).  Views
        are taken in msg_id order: ``first`` must be the oldest result not taken or held (the
        previous view's end or the queue's tail, past any results taken out of order there),
        since slots free only in that order.
        timeout, errors: as ``take_results``; with errors="raise" and a flagged result, the range
        is taken as copies and ProtocolError raised (``.results``), so no view is left held.

        Raises ConfigError (first is not the oldest result not taken or held, or bad arguments),
        UnknownMessage, ResultTimeout, KernelStopped, ProtocolError / MessageFailed, QueueClosed, TypeError.
        Thread safety: any thread; the view may be released from another thread.
        """
        if self.config.result_memory == "device":
            raise ConfigError(
                "view_results lends the result ring in host memory; with QueueConfig(result_memory='device') "
                "the results are in VRAM: view_results_device lends them there (CuPy, torch), take_results copies"
            )
        first, n, timeout = self._range_args(first, n, timeout, errors, lo=1)
        return self._take_range(first, n, timeout, "view", None, errors)

    def take_ready(self, max_items: int | None = None, *, packed: bool = False, errors="raise"):
        """Take the results that are ready, in msg_id order, from the oldest not taken: returns
        ``(first, data, lengths)`` for msg_ids ``first .. first + len(lengths) - 1``, stopping at
        the first not done (or taken out of order), at most ``max_items`` (None: no cap).  Does not
        wait: with nothing ready, lengths is empty (and a lease is launched if messages wait and
        none runs, as ``poll_completions`` does).  data, packed, errors: as ``take_results``.

        The batch form of ``for m in poll_completions(): try_dequeue_result(m)`` for a consumer that
        takes everything in order.  Raises ConfigError, ProtocolError / MessageFailed, QueueClosed,
        KernelStopped.
        """
        if max_items is not None:
            max_items = check_int("max_items", max_items, 0)
        if errors not in ("raise", "mark"):
            raise ConfigError(f"errors={errors!r} must be 'raise' or 'mark'")
        mode = "packed" if packed else "copy"
        rings = self._rings()
        with self._clock:
            if self._res_hdr is None:
                raise QueueClosed("queue is closed")
            if self._dropped:
                self._release_dropped()
            start, head = self._oldest_free(), self._head
            end = head if max_items is None else min(head, start + max_items)
            k = 0
            if end > start:
                ids = np.arange(start, end, dtype=np.uint64)
                for s0, i0, m in _segments(start, end - start, self._cap):
                    ok = (rings.res_ids[s0 : s0 + m] == ids[i0 : i0 + m]) & (
                        rings.taken[s0 : s0 + m] != ids[i0 : i0 + m]
                    )
                    if ok.all():
                        k += m
                        continue
                    k += int(np.argmin(ok))
                    break
            if k:
                data, lens = self._take_locked(start, k, mode, None, errors)
                return start, data, lens
        self._keep_serving()
        self._give_way()
        empty = np.zeros((0,) if packed else (0, self._sb), np.uint8)
        return start, empty, np.zeros(0, np.uint32)

    def _range_args(self, first, n, timeout, errors, lo: int = 0):
        """Checked (first, n, timeout) of a range call; ``lo``: the least n (1 for a view)."""
        self._slot(first)  # TypeError unless an int
        first = int(first)
        if first < 0:
            raise UnknownMessage(f"msg_id {first} was never issued")
        n = check_int("n", n, lo, self._cap)
        if n and first + n > NO_MSG:  # msg_ids are uint64: such a range was never issued (nor can be)
            raise UnknownMessage(f"msg_id {first} was never issued (msg_ids are below 2**64; the next is {self._head})")
        try:
            timeout = float("inf") if timeout is None else check_seconds("timeout", timeout)
        except ConfigError as exc:
            raise ConfigError(f"{exc}, or None (no limit)") from None
        if errors not in ("raise", "mark"):
            raise ConfigError(f"errors={errors!r} must be 'raise' or 'mark'")
        return first, n, timeout

    def _take_range(self, first: int, n: int, timeout: float, mode: str, out, errors):
        if n == 0:
            with self._clock:
                if self._res_hdr is None:
                    raise QueueClosed("queue is closed")
            shape = (0,) if mode == "packed" else (0, self._sb)
            return (out if out is not None else np.zeros(shape, np.uint8)), np.zeros(0, np.uint32)
        rings = self._rings()
        view = mode == "view" or mode == "device"  # "device": view_results_device (device_arrays.py)
        if view:
            n = min(n, self._cap - (first & self._mask))
        ids = np.arange(first, first + n, dtype=np.uint64)
        segs = _segments(first, n, self._cap)
        start = time.perf_counter()
        pause, stopped = 0.0, False
        last_slot, last = (first + n - 1) & self._mask, first + n - 1
        while True:
            with self._clock:
                if self._res_hdr is None:
                    raise QueueClosed("queue is closed")
                if self._dropped:
                    self._release_dropped()
                self._check_takeable(first, n, ids, segs, rings, _VIEW_CALLS.get(mode))
                # the last is usually done last: one look at it before the whole range
                if rings.res_ids[last_slot] == last and _first_missing(rings, ids, segs) < 0:
                    return self._take_locked(first, n, mode, out, errors, ids)
            waited = time.perf_counter() - start
            if stopped or waited > timeout:
                with self._clock:
                    if self._res_hdr is None:
                        raise QueueClosed("queue is closed")
                    missing = _first_missing(rings, ids, segs)
                if missing < 0:
                    continue  # done meanwhile
            if stopped:
                raise KernelStopped(
                    f"the kernel has stopped; msg_id {first + missing} was not processed and never will be"
                )
            if waited > timeout:
                self._give_way()  # timeout=0 in a loop must not hold back the queue's threads
                why = " (the queue is paused: resume() lets the kernel process it)" if self._leases.paused else ""
                raise ResultTimeout(
                    f"msg_id {first + missing} (of msg_ids {first}..{first + n - 1}) was not done within {timeout} s"
                    f"{why}; nothing was taken"
                )
            if waited > 50e-6:
                self._keep_serving()
                stopped = self._kernel.exited()  # one more look: the last may have finished meanwhile
                if not stopped:
                    time.sleep(pause)
                    pause = min(1e-3, pause * 2 or 1e-6)

    def _check_takeable(self, first: int, n: int, ids, segs, rings, view: str | None) -> None:
        """Every msg_id of the range is issued, not taken and not held (the consumer lock is held).
        view: the call that lends them (``view_results``, ``view_results_device``), None for a take."""
        head, tail = self._head, self._tail
        views = self._views
        if first + n > head:
            raise UnknownMessage(
                f"msg_id {max(first, head)} was never issued (msg_ids {first}..{first + n - 1} asked; "
                f"the next msg_id is {head})"
            )
        if first < tail:
            raise UnknownMessage(f"msg_id {first} was already taken")
        if view:
            oldest = self._oldest_free()
            if first != oldest:
                raise ConfigError(
                    f"{view} must start at msg_id {oldest}, the oldest result not taken or held (slots "
                    f"free in msg_id order), not {first}; take_results copies a range anywhere"
                )
        if not self._taken_ahead and not views:
            return  # nothing at or after the tail is taken or held: no mark can match
        for s0, i0, k in segs:
            gone = rings.taken[s0 : s0 + k] == ids[i0 : i0 + k]
            if gone.any():
                m = first + i0 + int(np.argmax(gone))
                raise UnknownMessage(f"msg_id {m} was already taken or is held by a result view")

    def _take_locked(self, first: int, n: int, mode: str, out, errors, ids=None):
        """Take msg_ids first .. first + n - 1, all done and takeable (the consumer lock is held)."""
        rings = self._rings()
        segs = _segments(first, n, self._cap)
        lend = mode == "view" or mode == "device"
        lens, bad, flags = _decode(rings.res_hdr32, segs, lend)
        flagged = flags is not None and bool(bad.any())
        if lend and not (flagged and errors == "raise"):
            s0 = segs[0][0]
            if mode == "device":  # the result ring in VRAM, lent as a DeviceArray (device_arrays.py)
                view = self._device_view(first, s0, n, lens, flags)
            else:
                data = rings.res_data[s0 : s0 + n].view()
                data.flags.writeable = False
                view = ResultView(self, first, data, lens, flags)
            # Held: marked taken (try_dequeue_result, wait_result, poll and outstanding pass them
            # by), and the first's msg_id word cleared, since try_dequeue_result takes the tail
            # without looking at its mark (only a view's first can become the tail while held).
            rings.taken[s0 : s0 + n] = ids if ids is not None else np.arange(first, first + n, dtype=np.uint64)
            rings.res_ids[s0] = NO_MSG
            self._polled = max(self._polled, first + n)
            if self._views is None:
                self._views, self._dropped = [], []
            self._views.append(view._rec)
            return view
        ok_lens = np.where(bad, 0, lens) if flagged else lens
        if mode == "packed":
            parts = [_gather_packed(rings.res_data[s0 : s0 + k], ok_lens[i0 : i0 + k]) for s0, i0, k in segs]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        else:
            data = out if out is not None else np.empty((n, self._sb), np.uint8)
            width = min(self._sb, (int(ok_lens.max()) + 15) & ~15)
            for s0, i0, k in segs:
                data[i0 : i0 + k, :width] = rings.res_data[s0 : s0 + k, :width]
        # Copied out: now free the slots (a producer may refill them at once).
        if first == self._tail:
            nxt, taken, mask, head = first + n, self._taken, self._mask, self._head
            while nxt < head and taken[nxt & mask] == nxt:
                nxt += 1
            self._taken_ahead -= nxt - first - n
            self._tail = nxt
            if self._accepting:
                self._limit = nxt + self._cap
        else:
            for s0, i0, k in segs:
                rings.taken[s0 : s0 + k] = np.arange(first + i0, first + i0 + k, dtype=np.uint64)
            self._taken_ahead += n
        if flagged and errors == "raise":
            raise _bulk_failure(first, flags, bad, data, lens, self._plugin_name)
        return data, lens

    def _oldest_free(self) -> int:
        """The oldest msg_id neither taken nor held by a view: after the last view held (or the
        tail), past the results taken out of order there (the consumer lock is held)."""
        views, taken, mask, head = self._views, self._taken, self._mask, self._head
        start = sum(views[-1]) if views else self._tail
        while start < head and taken[start & mask] == start:
            start += 1
        return start

    def _release_view(self, rec: list) -> None:
        """Free a held view's slots (the consumer lock is held)."""
        views = self._views
        if self._res_hdr is None or not views or not any(r is rec for r in views):
            return  # closed: nothing to free
        a, n = rec
        if views[0] is rec:  # the oldest: the tail moves past it and what was taken after it
            views.pop(0)
            nxt, taken, mask = a + n, self._taken, self._mask
            stop = views[0][0] if views else self._head
            while nxt < stop and taken[nxt & mask] == nxt:
                nxt += 1
            self._taken_ahead -= nxt - a - n
            self._tail = nxt
            if self._accepting:
                self._limit = nxt + self._cap
        else:  # a later view: taken ahead, freed with the views before it
            views.remove(rec)  # the records are distinct lists: == finds this one (firsts differ)
            self._taken_ahead += n

    def _release_dropped(self) -> None:
        """Release the views dropped unreleased while the consumer lock was busy (it is held now)."""
        dropped = self._dropped
        while dropped:
            self._release_view(dropped.pop())
