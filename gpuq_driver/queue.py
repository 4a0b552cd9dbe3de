"""GpuQueue: a message queue whose ring lives in GPU-visible memory, served by one persistent kernel.

    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=512)) as q:
        msg_id = q.enqueue(b"hello")            # bytes-like, <= slot_bytes
        while (result := q.try_dequeue_result(msg_id)) is None:
            pass                                # or q.poll_completions() for many at once

The host side is plain loads and stores into mapped pinned memory: ``enqueue`` copies the
payload into its request slot, writes the slot header, then rings the doorbell (a 64-bit store);
no CUDA call is made on the hot path (and where a C compiler and Python's headers are found,
``enqueue`` and ``try_dequeue_result`` run their common case compiled: hostpath.py, ``host_path``);
the kernel leaves every ``lease_ms`` so that the rest of
the process can use the GPU, and a keeper thread launches the next lease ahead while traffic is
recent (lease.py); a producer launches one only into a parked queue or when the keeper lags.
``docs/design.md`` gives the placement and the numbers behind it; ``device_src/gpuq_layout.cuh``
the protocol.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import math
import numbers
import threading
import time
import weakref
from dataclasses import dataclass, fields
from zlib import crc32

import numpy as np

from . import hostpath
from .backend import Backend
from .bulk import BulkCalls, acquire_noted
from .device_arrays import DeviceCalls, StagedBytes
from .errors import (
    ConfigError,
    GpuqError,
    KernelStopped,
    MessageFailed,
    PayloadError,
    PluginHung,
    ProtocolError,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
    check_int,
    check_number,
    check_seconds,
)
from .layout import (
    CHECK_LOW,
    DONE,
    DOORBELL_STOP_SHIFT,
    ERR_MASK,
    ERR_SHIFT,
    ERROR_NAMES,
    FAIL_CODE_SHIFT,
    KERNEL_EXITED,
    KERNEL_PARKED,
    KERNEL_RUNNING,
    NO_MSG,
    READY,
    RESULT_FAILED,
    STOP_ABORT,
    STOP_DRAIN,
    CtrlDev,
    check_slot_bytes,
    check_threads_per_block,
    is_power_of_two,
)
from .lease import Leases
from .params import check_params, describe
from .payload import byte_view
from .plugins import Plugin, resolve
from .sim import SIM_NEEDS_TWIN

MAX_CAPACITY = 1 << 22
MAX_RING_BYTES = 1 << 32
MIN_LEASE_MS, MAX_LEASE_MS = 0.05, 3_600_000.0  # 50 µs .. 1 hour (or math.inf: never leave)
MAX_SCOUTS = 4  # QueueConfig.scouts: more only add PCIe reads of one line (docs/design.md, "Scouts")


def _msg_id_int(msg_id) -> int:
    """``msg_id`` as an int (a numpy integer's value); TypeError for a bool (numpy's too: np.True_
    would otherwise be msg_id 1) and for anything not an integer (float, str, array)."""
    if isinstance(msg_id, numbers.Integral) and not isinstance(msg_id, bool):
        return int(msg_id)
    name = "bool" if isinstance(msg_id, (bool, np.bool_)) else type(msg_id).__name__
    raise TypeError(f"msg_id must be an int, not {name}")


@dataclass(frozen=True)
class QueueConfig:
    """How a GpuQueue is built.  Every field is checked in ``__post_init__`` (ConfigError names it).

    capacity:           slots in the ring, a power of two, 2 .. 4,194,304 (default 1024).
    slot_bytes:         payload bytes per slot, a multiple of 16, 16 .. 1,048,576 (default 512);
                        results are at most this long too.  capacity × slot_bytes <= 4 GiB.
    plugin:             the processing function run on each message: a name (a built-in, "echo"
                        (default), "crc32c" or "score", or a package's entry point) or a ``Plugin``
                        (``Plugin.from_source`` / ``Plugin.from_file``); plugins.resolve looks it
                        up here, so an unknown name is refused at once with what exists.  On
                        ``backend="sim"`` the plugin needs a Python twin.
    blocks:             blocks of the persistent grid; None (default) = one per SM.  Must fit a
                        cooperative launch: <= occupancy × SM count.
    threads_per_block:  a multiple of 32, 32 .. 1024 (default 64: two worker warps per block).  The
                        queue kernel needs more than 64 registers a thread, so 1,024-thread blocks
                        do not fit an SM (GpuQueue raises ConfigError on the GPU, naming the
                        largest block that fits; the simulator ignores it); on the H200 up to 640 fit.
    enqueue_timeout_s:  how long ``enqueue`` waits for a free slot before QueueFull (default 1.0 s;
                        ``math.inf`` waits until a slot frees or the queue shuts down).
    shutdown_timeout_s: how long ``shutdown`` (and ``pause``) wait for the kernel (default 10.0 s).
    lease_ms:           the kernel leaves after serving this long (at a message boundary) and the
                        next message launches it again, so that synchronising CUDA calls elsewhere
                        in the process (torch.cuda.synchronize, cuMemFree, module loads, GEMMs)
                        wait at most ~2 × lease_ms (default 1.0 ms; 0.05 .. 3,600,000, or
                        ``math.inf``: never leaves, lowest overhead, but any such call then hangs
                        while the queue lives, and ``pause()`` is refused).  docs/design.md,
                        "Sharing the GPU", has the measurements.
    linger_ms:          after the last message the kernel keeps serving (lease after lease, the
                        next always queued) this long before it parks, so that a message after a
                        shorter pause in traffic costs a plain round trip (10-16 µs p50 after 5-50
                        ms of quiet on the H200) instead of a launch (~65 µs p50, the host thread
                        having slept: docs/design.md); default 100.0 ms; 0 ..
                        3,600,000 or ``math.inf`` (never park).  While it lingers the kernel polls
                        the doorbell (one block per SM, ~1 PCIe read per µs); other CUDA work waits
                        at most ~2 × lease_ms, as under traffic.
    front_backoff_ns:   the front warp reads the doorbell over PCIe back to back (one read in
                        flight, ~1 µs each) while traffic is recent; after 1,024 empty reads it
                        sleeps between reads, growing up to this cap (default 1000 ns; 0 = always
                        spin).  Lower is lower latency after idle, more PCIe reads.
    idle_backoff_ns:    cap of the __nanosleep of the other idle warps, which poll VRAM
                        (default 2000 ns).
    watchdog_ms:        a plugin that does not return (an endless loop, a wait for a value nothing
                        writes) keeps its lease running for ever; once messages have waited this
                        long with a lease running and no message finished, the queue stops for good
                        and every waiter raises PluginHung naming the msg_id in the plugin (default
                        5,000 ms: far above any sane plugin's time per message, and below
                        ``shutdown_timeout_s``'s 10 s, so that a hang met by ``shutdown``/``close``
                        is named, not a generic timeout; 1 .. 3,600,000, or ``math.inf``: never,
                        e.g. under a debugger).  A plugin that faults is reported within
                        min(2 × lease_ms, 50 ms) + 10 ms whatever this says (docs/api.md, "Faults").
    device:             CUDA device ordinal (default 0).
    backend:            "cuda" (default) or "sim" (the CPU simulator in sim.py, for tests; it runs
                        one warp whatever ``blocks`` and ``threads_per_block`` say, and ``stats()``
                        reports that geometry).
    params:             per-queue parameters the plugin reads (e.g. the weight matrix of "score"):
                        any C-contiguous bytes-like object (bytes, bytearray, memoryview, a numpy
                        array: its raw bytes in C order), 0 .. 1 GiB (1,073,741,824 bytes); None
                        or empty (default) = none.  Kept as an immutable copy (``bytes``: the
                        config stays hashable and compares by content; ``repr`` shows only the
                        size).  On the GPU it is uploaded once to VRAM before the first launch
                        (ConfigError there if it exceeds the free VRAM) and freed at ``close()``;
                        the device code reads it with ``gpuq_params()`` /
                        ``gpuq_params_bytes()``, the twin as its ``params`` argument (params.py).
    one_read:           False (default): the front warp polls the doorbell, then reads the slot (two
                        PCIe round trips).  True: ``enqueue`` puts a 24-bit check of a message of at
                        most 64 bytes in its header (a CRC: 0.2-0.5 µs of host time on the H200
                        machines) and the front warp's polls read the slot beside the doorbell,
                        serving a message whose check holds at once (a torn or stale read is read
                        again): on the H200, 64 B round trip p50 4.4-5.3 vs 5.4-6.4 µs
                        (configurations interleaved in one run).  ``enqueue`` checks a message
                        only where the front warp polls for it or the one before (behind a
                        backlog the doorbell serves it anyway), and the polls read the slot only
                        while the last message served was checked; still one thread's enqueue
                        rate into a backlog is ~7 % lower (1.15 vs 1.24 M msg/s, medians of
                        interleaved rounds; 512 B and 4 KB round trips -0.4 to +0.75 µs against
                        two reads from run to run), so it is an option, not the default
                        (docs/design.md, "One read per message").  The batch calls never add the
                        check (their messages are served in ranges).
    scouts:             with ``one_read``: how many of the grid's warps are scouts, 0 (default) .. 4
                        (the kernel takes at most its warps - 1; ignored without ``one_read`` and
                        by the simulator).  A scout polls the slot the front warp waits for,
                        between the front's polls, so that a new message waits for the next of
                        1 + ``scouts`` polls instead of the front's next one; the first to see it
                        serves it (a bid in VRAM decides; docs/design.md, "Scouts").  Measured on
                        the H200: one scout, 64 B round trip p50 0.12-0.51 µs lower on three lent
                        machines, 0.18 µs higher on a fourth;
                        reads of the same lines in flight together slow each poll (~0.45 µs), so a
                        512 B message came back 1.3 µs later than with the one read alone (4 KB:
                        1.9 µs later than with two reads), and two or three scouts were slower
                        than none: an option for queues of small messages, off by default.
    result_memory:      where the result payloads live: "host" (default: mapped pinned memory, read
                        in place by the host calls and ``view_results``) or "device" (VRAM, allocated
                        before the first launch: ``view_results_device`` lends them to CuPy / torch
                        with no copy; the host calls copy them out with cuMemcpy2DAsync on the
                        queue's own stream, which costs a CUDA call and a wait per take;
                        ``view_results`` is refused).  The result headers stay in mapped memory
                        either way (device_arrays.py, docs/design.md "Device arrays").
    """

    capacity: int = 1024
    slot_bytes: int = 512
    plugin: str | Plugin = "echo"
    blocks: int | None = None
    threads_per_block: int = 64
    enqueue_timeout_s: float = 1.0
    shutdown_timeout_s: float = 10.0
    lease_ms: float = 1.0
    linger_ms: float = 100.0
    front_backoff_ns: int = 1000
    idle_backoff_ns: int = 2000
    watchdog_ms: float = 5000.0
    device: int = 0
    backend: str = "cuda"
    params: bytes = b""
    one_read: bool = False
    scouts: int = 0
    result_memory: str = "host"

    def __post_init__(self):
        def check(name, lo, hi):
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo, hi))

        check("capacity", 2, MAX_CAPACITY)
        if not is_power_of_two(self.capacity):
            raise ConfigError(
                f"capacity={self.capacity} must be a power of two (e.g. {1 << self.capacity.bit_length()})"
            )
        object.__setattr__(self, "slot_bytes", check_slot_bytes(self.slot_bytes))
        if self.capacity * self.slot_bytes > MAX_RING_BYTES:
            raise ConfigError(f"capacity*slot_bytes={self.capacity * self.slot_bytes} exceeds {MAX_RING_BYTES} bytes")
        if self.blocks is not None:
            check("blocks", 1, 65535)
        if isinstance(self.one_read, np.bool_):  # np.True_: accepted, as numpy integers are elsewhere
            object.__setattr__(self, "one_read", bool(self.one_read))
        if not isinstance(self.one_read, bool):
            raise ConfigError(f"one_read={self.one_read!r} must be True or False")
        object.__setattr__(self, "threads_per_block", check_threads_per_block(self.threads_per_block))
        for name in ("enqueue_timeout_s", "shutdown_timeout_s"):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        object.__setattr__(
            self,
            "lease_ms",
            check_number("lease_ms", self.lease_ms, MIN_LEASE_MS, MAX_LEASE_MS, " of milliseconds", allow_inf=True),
        )
        object.__setattr__(
            self,
            "linger_ms",
            check_number("linger_ms", self.linger_ms, 0.0, MAX_LEASE_MS, " of milliseconds", allow_inf=True),
        )
        object.__setattr__(
            self,
            "watchdog_ms",
            check_number("watchdog_ms", self.watchdog_ms, 1.0, MAX_LEASE_MS, " of milliseconds", allow_inf=True),
        )
        check("front_backoff_ns", 0, 1_000_000)
        check("idle_backoff_ns", 0, 1_000_000)
        check("scouts", 0, MAX_SCOUTS)
        check("device", 0, 1023)
        if self.backend not in ("cuda", "sim"):
            raise ConfigError(f"backend={self.backend!r} must be 'cuda' or 'sim'")
        if self.result_memory not in ("host", "device"):
            raise ConfigError(f"result_memory={self.result_memory!r} must be 'host' or 'device'")
        resolve(self.plugin, SIM_NEEDS_TWIN if self.backend == "sim" else None)
        object.__setattr__(self, "params", check_params(self.params))

    def __repr__(self) -> str:  # the dataclass's, but params by its size only (it may be 1 GiB)
        shown = [describe(self.params) if f.name == "params" else repr(getattr(self, f.name)) for f in fields(self)]
        return f"QueueConfig({', '.join(f'{f.name}={v}' for f, v in zip(fields(self), shown))})"

    @property
    def lease_ns(self) -> int:
        """``lease_ms`` in nanoseconds, as the kernel takes it (2**64 - 1 for ``math.inf``)."""
        return (1 << 64) - 1 if math.isinf(self.lease_ms) else int(self.lease_ms * 1e6)


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue's counters (message counts; no units).

    enqueued:  messages accepted by ``enqueue``, ``enqueue_many`` and ``commit`` (the doorbell value).
    processed: results the device has published (sum of its per-warp counters, read in place).
    taken:     results removed by ``try_dequeue_result``, the batch takes and released result views
               (a DeviceResultView once its exported arrays are gone too: ``freed``).
    pending:   enqueued - processed: READY or INFLIGHT on the device.
    occupied:  enqueued - taken: slots not EMPTY (the ring is full at ``capacity``).
    capacity, slot_bytes, blocks, threads_per_block, warps: the running geometry.
    kernel:    "running" (a lease is serving), "parked" (between leases: no GPU work; the next
               message launches one), "paused" (``pause()``), "exited" (shut down), "not started",
               "faulted" (a plugin faulted: KernelFault; the CUDA context is lost), "hung" (a
               plugin did not return within ``watchdog_ms``: PluginHung).
    launches:  leases launched (the first at construction, then one per lease under traffic).
    exits:     leases that have ended (on time, paused or shut down); launches - exits <= 2.
    pauses:    times ``pause()`` asked the kernel to park (a pause nested in another not counted).
    backend:   "cuda" or "sim".
    fault:     "" while the kernel has not failed; else the KernelFault's or PluginHung's message.
    spec_reads:   messages the front warp served from its one read of doorbell and slot
                  (``QueueConfig.one_read``; exact at each lease end, possibly a little behind while
                  a lease runs).
    spec_retries: such reads whose check failed (torn or stale: read again); the torn-read counter.
    """

    enqueued: int
    processed: int
    taken: int
    pending: int
    occupied: int
    capacity: int
    slot_bytes: int
    blocks: int
    threads_per_block: int
    warps: int
    kernel: str
    launches: int
    exits: int
    pauses: int
    backend: str
    fault: str = ""
    spec_reads: int = 0
    spec_retries: int = 0


class GpuQueue(BulkCalls, DeviceCalls):
    """A ring of ``capacity`` slots served by one persistent cooperative kernel.

    Thread safety: any number of producer threads may call ``enqueue`` and any number of consumer
    threads ``poll_completions`` / ``try_dequeue_result``; producers share one lock, consumers
    another.  The CUDA calls it makes (start, a launch per lease, stop, close) make the context
    current in the calling thread.  Raises on construction: ConfigError, CudaUnavailable,
    CompileError, CudaError, GpuqError (the kernel did not start).

    host_path: "compiled" where ``enqueue`` and ``try_dequeue_result`` are this queue's compiled
    calls (gpuq_driver/hostpath.c: the Python methods' common case in C, ~3x less host time per
    call; every other case runs the Python methods), "python" where they are the Python methods
    (no C compiler or Python headers, ``GPUQ_HOST_PATH=python``, results in VRAM, or a subclass
    of GpuQueue).  The compiled calls are instance attributes: patch them on the queue, not on the
    class.

    Batch calls, many messages per Python call (``enqueue_many``, ``reserve``/``commit``,
    ``take_results``, ``view_results``, ``take_ready``, ``free_slots``), are in bulk.py (BulkCalls);
    device arrays in and out (``enqueue_device``, ``view_results_device``) in device_arrays.py.

    The kernel runs in leases of ``config.lease_ms`` (lease.py), so the rest of the process may
    use the GPU while a queue lives; ``pause()`` parks it for longer stretches.  At interpreter
    exit an open queue is stopped but its memory is not freed (threads may still use it); every
    call then raises QueueClosed, as after ``close()``.
    """

    def __init__(self, config: QueueConfig | None = None):
        config = config if config is not None else QueueConfig()
        if not isinstance(config, QueueConfig):
            raise ConfigError(f"config must be a QueueConfig, not {type(config).__name__}")
        self.config = config
        if config.backend == "sim":
            from .sim import SimulatedKernel as make_kernel
        else:
            from .kernel import PersistentKernel as make_kernel
        self._kernel: Backend = make_kernel(config)
        kernel = self._kernel
        self._plugin_name = kernel.plugin.name
        self._leases = leases = Leases(
            kernel,
            config.lease_ms,
            config.linger_ms,
            config.watchdog_ms,
            kernel.plugin.name,
            config.device if config.backend == "cuda" else None,
        )
        self._finalizer = weakref.finalize(self, _close_kernel, leases, kernel)
        self._finalizer.atexit = False  # _abandon_open_queues handles exit
        lay, mem, cap, sb = kernel.layout, kernel.mem, config.capacity, config.slot_bytes
        self._cap, self._mask, self._sb = cap, cap - 1, sb
        self._doorbell = kernel.doorbell  # GpuqCtrlHost.doorbell: head | stop << 56
        self._req_hdr = lay.view(mem, "req_hdr", "Q")  # [2s] len|flags<<32, [2s+1] msg_id
        self._req_hdr32 = lay.view(mem, "req_hdr", "I")  # [4s] len, [4s+1] flags (the slot check's stores)
        self._res_hdr = lay.view(mem, "res_hdr", "Q")
        self._req_data = lay.view(mem, "req_data")
        self._res_data = lay.view(mem, "res_data")
        if config.result_memory == "device":  # results in VRAM; this region stages the host's copies
            self._res_data = StagedBytes(kernel.dmem, self._res_data)
        self._counters = np.frombuffer(lay.view(mem, "warp_counters"), dtype=np.uint64)
        for hdr in (self._req_hdr, self._res_hdr):
            np.frombuffer(hdr, dtype=np.uint64)[1::2] = NO_MSG
        self._ready = READY << 32
        self._one_read = config.one_read
        # GpuqCtrlDev.front: the msg_id the front warp polls for (one_read); enqueue checks a message
        # less than _check_depth ahead of it (the torn-read stress sets it past the ring: every one)
        self._front = lay.view(mem, "ctrl_dev", "Q")[CtrlDev.front.offset // 8 :][:1]
        self._check_depth = 2
        # producer state (under _plock) and consumer state (under _clock)
        self._plock, self._clock = threading.Lock(), threading.Lock()
        self._head = 0  # next msg_id; the doorbell's head
        self._tail = 0  # every msg_id below this has been taken
        self._limit = cap  # _tail + capacity: the first msg_id with no free slot; -1 once shut down
        self._polled = 0  # poll_completions reported everything below this
        # msg_id last taken from each slot: a msg_id >= _tail is taken iff _taken[slot] == msg_id
        # (stale entries never match a later msg_id, so nothing needs clearing)
        self._taken = array.array("Q", [NO_MSG]) * cap
        self._taken_ahead = 0  # results taken out of order, at or after _tail
        # a producer holding the producer lock lets go of the GIL for a while and wants it back: it
        # waits for a free slot (_wait_for_slot) or copies a batch (bulk.py, device_arrays.py); _give_way
        self._producer_away = False
        self._accepting = True
        self._stop_mode = None  # STOP_DRAIN / STOP_ABORT once shutdown has asked
        self._begun = leases.begun  # GpuqCtrlDev.leases_begun
        self._leaving = leases.leaving  # GpuqCtrlDev.leases_leaving, read after every enqueue
        # A launch may be due once lease launches - 1 is leaving (the hand-over), or, for a kernel
        # that never leaves (no successor is ever queued), only once the newest one is: without
        # that, every enqueue into such a queue went through Leases.after_publish (~0.3 µs).
        self._lag = 0 if math.isinf(self.config.lease_ms) else 1
        try:
            # enqueue and try_dequeue_result's common case compiled, where it can be (hostpath.py);
            # not for a subclass: its __setattr__, properties or overrides would run Python code
            # where the compiled calls rely on running none
            self.host_path = "python"
            if type(self) is GpuQueue:
                fast = hostpath.bind(self, GpuQueue.enqueue, GpuQueue.try_dequeue_result)
                if fast is not None:
                    self.enqueue, self.try_dequeue_result, self.host_path = fast.enqueue, fast.take, "compiled"
            kernel.start()
            leases.kick()
            self._wait_for_first_lease(10.0)
        except BaseException:
            self._finalizer()
            raise
        # weak: a dropped queue is still collected
        leases.keep(
            weakref.WeakMethod(self._enqueued),
            weakref.WeakMethod(self._processed),
            weakref.WeakMethod(self._oldest_unprocessed),
            weakref.WeakMethod(self._stop_for_good),
        )
        _open_queues.add(self)

    def _pending(self) -> bool:
        """Messages enqueued and not yet processed."""
        return self._head > int(self._counters.sum())

    def _processed(self) -> int:
        """Messages the device has processed (the sum of its per-warp counters)."""
        return int(self._counters.sum())

    def _oldest_unprocessed(self) -> int | None:
        """The oldest msg_id enqueued whose result the device has not published (None if none):
        the watchdog's name for the message in the plugin.  One pass over the untaken slots."""
        hdr = self._res_hdr
        if hdr is None:
            return None
        ids = np.arange(self._tail, self._head, dtype=np.uint64)
        published = np.frombuffer(hdr, dtype=np.uint64)[1::2][ids & np.uint64(self._mask)]
        undone = np.flatnonzero(published != ids)
        return int(ids[undone[0]]) if len(undone) else None

    def _stop_for_good(self) -> None:
        """The kernel faulted or hung (lease.Leases.fail): no message is accepted from now on
        (``enqueue`` raises the failure), as after shutdown."""
        self._accepting = False
        held: list = []  # consumers move _limit under _clock, only while accepting
        try:
            acquire_noted(held, self._clock, True, 1.0)
            self._limit = -1
        finally:
            if held:
                self._clock.release()

    def _enqueued(self) -> int:
        """Messages enqueued so far: the lease keeper's look at the traffic."""
        return self._head

    def _wait_for_first_lease(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._begun[0] == 0:
            if self._kernel.idle():
                raise GpuqError("the persistent kernel exited before it started serving")
            if time.monotonic() > deadline:
                raise GpuqError(
                    f"the persistent kernel did not start within {timeout_s} s "
                    "(is the GPU fully taken by other kernels?)"
                )
            time.sleep(1e-4)

    # -- producer ------------------------------------------------------------------------------

    def enqueue(self, payload, timeout: float | None = None) -> int:
        """Copy ``payload`` into the next slot and publish it; return its ``msg_id`` (0, 1, 2, ...).

        payload: any C-contiguous bytes-like object (bytes, bytearray, memoryview, numpy array),
                 at most ``slot_bytes`` bytes (0 is allowed).
        timeout: seconds to wait while the ring is full (every slot holds a message or an untaken
                 result); None = ``config.enqueue_timeout_s``; 0 = fail at once.
        Raises PayloadError (too large), PayloadTypeError (not bytes-like), ConfigError (a timeout
        that is not a number >= 0), QueueFull (no slot freed within the timeout; nothing enqueued;
        the message names the msg_id holding the next slot), QueueClosed (after shutdown),
        KernelFault / PluginHung (a plugin faulted or hung: the queue accepts nothing more; also
        from the launch that follows a message, which is then queued but never processed),
        KernelStopped (the kernel stopped for good while waiting), CudaError (the next lease could
        not be launched: the message is queued, and ``outstanding()`` lists its msg_id, but the
        CUDA context is unusable).
        Cost: 0.7-2.0 µs from CPython 3.12 on the H200 hosts (by their CPU; 0.2-0.6 µs on the
        compiled host path, ``host_path``) and no CUDA call,
        except a launch (~3 µs, 20-50 µs after the thread slept) for the first message into a
        parked queue (idle longer than ``linger_ms``) and, once per lease, while the lease keeper
        thread is kept from the GIL.
        """
        if timeout is not None and not (type(timeout) in (int, float) and 0 <= timeout < 1e18):
            timeout = check_seconds("timeout", timeout)  # refused up front, not once the ring fills
        if type(payload) is not bytes:
            payload = byte_view(payload)
        n = len(payload)
        if n > self._sb:
            raise PayloadError(f"payload is {n} bytes; slot_bytes is {self._sb} (the limit per message)")
        # ``with``, not acquire(); try: a KeyboardInterrupt raised as acquire() returns (CPython runs
        # signal handlers after each call) would skip the finally and leave the lock held for good
        with self._plock:
            seq = self._head
            if seq >= self._limit:  # ring full, or shut down (_limit = -1)
                self._wait_for_slot(seq, timeout)
            slot = seq & self._mask
            off = slot * self._sb
            self._req_data[off : off + n] = payload
            hdr, slot = self._req_hdr, slot << 1
            # The slot check (layout.slot_check, inlined; crc32 masks its seed) where the front warp
            # polls for this message or the one before (GpuqCtrlDev.front).  Behind a longer backlog
            # the doorbell serves it anyway, and the check would cost the producer ~0.3 µs.
            if n <= 64 and self._one_read and seq - self._front[0] < self._check_depth:
                h32 = self._req_hdr32
                h32[slot << 1] = n
                h32[slot << 1 | 1] = (crc32(payload, seq ^ n << 24) | 0xFF) ^ CHECK_LOW
            else:
                hdr[slot] = n | self._ready
            hdr[slot | 1] = seq
            self._head = seq = seq + 1
            self._doorbell[0] = seq  # the doorbell, last
        # The lock's release is a full fence (x86 locked instruction): the doorbell store is
        # visible before these loads, the host half of the relaunch handshakes (lease.py).
        if self._leaving[0] >= self._leases.launches - self._lag:
            self._leases.after_publish()
        return seq - 1

    def _wait_for_slot(self, seq: int, timeout: float | None) -> None:
        self._leases.check()  # a fault or hang: say so rather than QueueClosed
        if not self._accepting:
            raise QueueClosed("queue is shut down: enqueue is no longer accepted")
        timeout = self.config.enqueue_timeout_s if timeout is None else check_seconds("timeout", timeout)
        deadline = time.monotonic() + timeout
        pause = 0.0
        self._producer_away = True  # this thread lets go of the GIL (sleeps, cuStreamQuery): _give_way
        try:
            while seq >= self._limit:
                if self._dropped:  # result views dropped unreleased while the consumer lock was busy (bulk.py)
                    with self._clock:
                        self._release_dropped()
                    continue
                self._leases.check()
                if not self._accepting:
                    raise QueueClosed("queue is shut down: enqueue is no longer accepted")
                if time.monotonic() >= deadline:
                    raise QueueFull(self._full_message(seq, timeout))
                if self._kernel.exited():
                    raise KernelStopped("the persistent kernel has stopped; the queue cannot make room")
                self._keep_serving()
                time.sleep(pause)
                pause = min(1e-3, pause * 2 or 1e-6)
        finally:
            self._producer_away = False  # one producer at a time: it holds the producer lock

    def _full_message(self, seq: int, timeout: float) -> str:
        """Why msg_id ``seq`` has no slot: the slots free in msg_id order, so the oldest message not
        taken holds them all up; name it and what it waits for."""
        t = self._tail
        done = self._res_hdr is not None and self._res_hdr[((t & self._mask) << 1) | 1] == t
        if self._views:  # bulk.py: the tail's result is lent to a ResultView
            why = self._held_why()
        elif self._leases.paused and not done:
            why = "is not processed yet: the queue is paused, resume() lets the kernel process it"
        elif done:
            why = f"has its result waiting: take it (try_dequeue_result({t})); slots free in msg_id order"
        else:
            why = "is not processed yet"
        return (
            f"ring full (waited {timeout} s): the slot for msg_id {seq} frees when msg_id {t} is taken, "
            f"and msg_id {t} {why}; {seq - t - self._taken_ahead} of {self._cap} slots hold messages "
            "or untaken results (outstanding() lists them)"
        )

    # -- consumer ------------------------------------------------------------------------------

    def poll_completions(self, max_items: int | None = None) -> list[int]:
        """msg_ids whose results are ready and not yet taken, each reported once, in msg_id order.

        Stops at the first message not yet done (a later one that finished early is reported
        once the earlier ones have).  ``max_items`` (int >= 0, numpy integers too, or None) caps
        the list.  Does not wait for the device (only for the consumer lock); finding nothing, it
        launches a lease if messages wait and none runs, and sleeps(0) while a thread of the queue
        waits for the GIL (``_give_way``: a loop of polls must not hold back a producer).  Raises
        QueueClosed after ``close()``, ConfigError (a ValueError) for a bad ``max_items``,
        KernelFault / PluginHung (finding nothing, once a plugin faulted or hung), KernelStopped if
        the kernel could not be launched again.
        """
        if max_items is not None:
            max_items = check_int("max_items", max_items, 0)
        with self._clock:  # not acquire(); try: (enqueue says why)
            if self._res_hdr is None:
                raise QueueClosed("queue is closed")
            if self._dropped:
                self._release_dropped()
            seq = max(self._polled, self._tail)
            end = self._head if max_items is None else min(self._head, seq + max_items)
            ids, taken, mask = self._res_hdr, self._taken, self._mask
            out = []
            while seq < end and ids[((seq & mask) << 1) | 1] == seq:
                if taken[seq & mask] != seq:
                    out.append(seq)
                seq += 1
            self._polled = seq
        if not out:
            self._keep_serving()
            self._give_way()
        return out

    def outstanding(self) -> list[int]:
        """msg_ids enqueued and not yet taken, in order: READY, INFLIGHT or DONE with the result
        waiting (a consumer that lost track of one finds it here; the ring frees slots in msg_id
        order, so an untaken result at the tail blocks every later slot).  Sleeps(0) while a thread
        of the queue waits for the GIL (``_give_way``), as ``poll_completions`` does.  Raises
        QueueClosed."""
        with self._clock:
            if self._res_hdr is None:
                raise QueueClosed("queue is closed")
            if self._dropped:
                self._release_dropped()
            taken, mask = self._taken, self._mask
            out = [m for m in range(self._tail, self._head) if taken[m & mask] != m]
        self._give_way()  # a loop of these must not hold back the queue's threads either
        return out

    def _keep_serving(self) -> None:
        """Messages wait unprocessed but no lease runs or is queued: launch one (the keeper thread
        does too; a consumer that waits need not wait for it).  Raises KernelFault / PluginHung if
        the kernel faulted or hung, KernelStopped if the keeper's launch failed, CudaError if this
        one does."""
        leases = self._leases
        leases.check()
        if leases.error is not None:
            raise KernelStopped(
                f"the persistent kernel could not be launched again ({leases.error}); "
                "the CUDA context is probably unusable"
            ) from leases.error
        if not leases.paused and not leases.serving() and self._pending():
            leases.kick()

    def _give_way(self) -> None:
        """``poll_completions``, ``try_dequeue_result`` or ``take_ready`` found nothing (or
        ``stats``, ``outstanding``, ``free_slots``, a ``take_results`` that timed out ran): if a thread
        of this queue has let go of the GIL for a moment and needs it back (a launch's driver call:
        ``Leases.launching``; a producer waiting for a free slot or copying a batch (NumPy and the
        driver let go of it): ``_producer_away``; the lease keeper due back from its wait, or in its
        look, whose driver calls let go of the GIL too: ``Leases.wake_at``), sleep(0) so that it
        gets it.  A thread spinning on these calls
        otherwise keeps the GIL for CPython's switch interval (5 ms): a producer beside a consumer
        spinning on ``poll_completions`` moved ~2,400 msg/s on the H200 host with 0.2 ms leases,
        each launch holding its enqueue 5-30 ms (NOTES.md, tenth session); a keeper held in its
        look hung a consumer spinning on ``try_dequeue_result`` (eleventh session).
        ``time.sleep(0)`` costs 50-60 µs on CPython 3.11 and 3.12, so only then: a thread spinning
        alone pays nothing but the keeper's looks (one sleep per look, every ``lease_ms`` .. 5 ms
        while messages flow).  Not ``os.sched_yield()`` (~1 µs): after it the spinner took the GIL
        back before the woken thread could, and CPython restarts that thread's 5 ms wait
        (simulator: 10,000-70,000 msg/s against 100,000-120,000 with sleep(0)).  Not for the
        simulator's kernel thread: a busy one would keep the GIL for 5 ms after each such
        hand-over.  ``wait_result`` and asyncio's looks go through these calls too."""
        leases = self._leases
        if leases.launching or self._producer_away or time.monotonic() >= leases.wake_at:
            time.sleep(0)

    def _slot(self, msg_id) -> int:
        """The slot of ``msg_id``; TypeError unless it is an int (numpy integers too, not bool)."""
        if type(msg_id) is not int:
            msg_id = _msg_id_int(msg_id)
        return msg_id & self._mask

    def try_dequeue_result(self, msg_id: int) -> bytes | None:
        """The result of ``msg_id`` as bytes (and its slot freed), or None if not done yet (then it
        sleeps(0) while a thread of the queue waits for the GIL: ``_give_way``).

        None also for a msg_id already taken or never issued.  Raises MessageFailed (``.msg_id``,
        ``.code``) if the plugin failed the message (GPUQ_FAIL(code) / plugins.Fail(code)), and
        ProtocolError if the device flagged this slot as broken: either way the result is taken and
        its slot freed.  TypeError if msg_id is not an int (numpy integers are; bools, numpy's too,
        are not).  QueueClosed after ``close()``.
        """
        if type(msg_id) is not int:  # self._slot, inlined (this call is on the round trip)
            msg_id = _msg_id_int(msg_id)
        slot = msg_id & self._mask
        with self._clock:  # not acquire(); try: (enqueue says why)
            hdr = self._res_hdr
            if hdr is None:
                raise QueueClosed("queue is closed")
            if hdr[(slot << 1) | 1] != msg_id:  # not done (or never issued)
                len_flags = None
            else:
                t = self._tail
                if msg_id != t and (not t < msg_id < self._head or self._taken[slot] == msg_id):
                    return None  # already taken
                # Copy the result out before the slot is freed: a producer may refill it at once.
                len_flags = hdr[slot << 1]
                off = slot * self._sb
                data = self._res_data[off : off + (len_flags & 0xFFFFFFFF)].tobytes()
                # Commit with single stores, so an interrupt leaves either nothing or everything done.
                if msg_id == t:  # in order: the tail moves past it and past later ones taken early
                    nxt = t + 1
                    if self._taken_ahead:
                        taken, mask, head = self._taken, self._mask, self._head
                        while nxt < head and taken[nxt & mask] == nxt:
                            nxt += 1
                        self._taken_ahead -= nxt - t - 1
                    self._tail = nxt
                    if self._accepting:
                        self._limit = nxt + self._cap
                else:
                    self._taken[slot] = msg_id
                    self._taken_ahead += 1
        if len_flags is None:
            self._give_way()
            return None
        flags = len_flags >> 32
        if flags != DONE:  # DONE | protocol error << ERR_SHIFT | RESULT_FAILED | failure code << 16
            if flags & RESULT_FAILED:
                raise MessageFailed(msg_id, flags >> FAIL_CODE_SHIFT, self._plugin_name)
            err = (flags >> ERR_SHIFT) & ERR_MASK
            raise ProtocolError(f"msg_id {msg_id}: device reported {ERROR_NAMES.get(err, err)}")
        return data

    def wait_result(self, msg_id: int, timeout: float | None = 1.0) -> bytes:
        """Block until ``msg_id``'s result is ready, take it and return it.

        Spins for the first ~50 µs (a round trip is a few µs), then sleeps in growing steps up to
        1 ms.  timeout: seconds, or None to wait as long as the kernel runs.  Raises ResultTimeout
        (a TimeoutError) after ``timeout`` (the result stays takeable), KernelStopped if the kernel
        has stopped for good and the message will never be processed (e.g. after
        ``shutdown(drain=False)``; KernelFault / PluginHung if a plugin faulted or did not return
        within ``watchdog_ms``: within the bounds of docs/api.md, "Faults", also with
        ``timeout=None``), UnknownMessage (a KeyError) for a msg_id already taken or never
        issued, TypeError for a msg_id that is not an int, ConfigError for a timeout that is not a
        number of seconds >= 0 or None, MessageFailed (the plugin failed it; taken, as in
        try_dequeue_result), ProtocolError, QueueClosed.
        """
        try:
            timeout = math.inf if timeout is None else check_seconds("timeout", timeout)
        except ConfigError as exc:
            raise ConfigError(f"{exc}, or None (no limit)") from None
        idx = (self._slot(msg_id) << 1) | 1
        start = time.perf_counter()
        with self._clock:  # spin on the result's msg_id word alone: ~50 ns a look
            hdr = self._res_hdr
            for _ in range(1000 if hdr is not None else 0):
                if hdr[idx] == msg_id:
                    break
        pause = 0.0
        while True:
            result = self.try_dequeue_result(msg_id)
            if result is not None:
                return result
            if not self._tail <= msg_id < self._head or self._taken[msg_id & self._mask] == msg_id:
                raise UnknownMessage(self._unknown(msg_id))
            self._leases.check()  # a fault or hang: it will never come
            waited = time.perf_counter() - start
            if waited > timeout:
                why = " (the queue is paused: resume() lets the kernel process it)" if self._leases.paused else ""
                raise ResultTimeout(f"no result for msg_id {msg_id} within {timeout} s{why}")
            if waited > 50e-6:
                self._keep_serving()
                if self._kernel.exited():
                    result = self.try_dequeue_result(msg_id)  # it may have finished last
                    if result is not None:
                        return result
                    raise KernelStopped(f"the kernel has stopped; msg_id {msg_id} was not processed and never will be")
                time.sleep(pause)
                pause = min(1e-3, pause * 2 or 1e-6)

    # -- state ---------------------------------------------------------------------------------

    def stats(self) -> QueueStats:
        """A QueueStats snapshot (reads device counters in place; no copy, no CUDA call).

        The counters are read one after another while producers, consumers and the device go
        on, so ``pending`` and ``occupied`` are clamped to 0 .. capacity.  Sleeps(0) while a thread
        of the queue waits for the GIL (``_give_way``), so that a loop waiting on a counter does not
        keep a launch or the lease keeper from running.

        Raises QueueClosed after ``close()``.
        """
        with self._clock:
            if self._res_hdr is None:
                raise QueueClosed("queue is closed")
            if self._dropped:
                self._release_dropped()
            k, leases = self._kernel, self._leases
            taken = self._tail + self._taken_ahead  # read before head: occupied is never negative
            # the one-read counters before processed: each is counted once its message is (the
            # device copies them at a lease's end; the simulator after the result), so spec_reads
            # <= processed in every snapshot
            spec_reads, spec_retries = int(k.ctrl.spec_reads), int(k.ctrl.spec_retries)
            processed = int(self._counters.sum())
            launches = leases.launches  # once, before what the device wrote: exits <= launches
            # leases_ended before state: a lease's last warp writes its state, then leases_ended
            # (end_lease), so a snapshot that counts every lease ended also sees its final state
            exits = int(leases.ended[0])
            state = k.ctrl.state
        head = self._head
        self._give_way()  # a loop waiting on a counter must not hold back the queue's threads
        failure = leases.failure
        if failure is not None:
            kernel = "hung" if isinstance(failure, PluginHung) else "faulted"
        elif state == KERNEL_EXITED:
            kernel = "exited"
        elif leases.paused and exits == launches:
            kernel = "paused"
        elif state == KERNEL_RUNNING or exits != launches:
            kernel = "running"
        else:
            kernel = "parked" if state == KERNEL_PARKED else "not started"
        cap = self._cap
        return QueueStats(
            enqueued=head,
            processed=processed,
            taken=taken,
            pending=min(cap, max(0, head - processed)),
            occupied=min(cap, max(0, head - taken)),
            capacity=cap,
            slot_bytes=self._sb,
            blocks=k.blocks,
            threads_per_block=k.threads,
            warps=k.warps,
            kernel=kernel,
            launches=launches,
            exits=exits,
            pauses=leases.pauses,
            backend=k.backend,
            fault=str(failure) if failure is not None else "",
            spec_reads=spec_reads,
            spec_retries=spec_retries,
        )

    # -- sharing the GPU -----------------------------------------------------------------------

    def pause(self, timeout: float | None = None) -> None:
        """Park the kernel: no lease runs until ``resume()``, so the GPU is the rest of the
        process's (for a stretch of CUDA work longer than a lease, or to measure without us).

        ``enqueue`` still accepts messages (they wait, READY, in the ring, and a full ring stays
        full); results already done can be taken; ``wait_result`` for a message not yet done waits
        for ``resume()`` (or its timeout).  Pauses nest, from any threads: the kernel runs again
        after as many ``resume()`` calls.  Returns once no lease runs or is queued: within
        ~2 × ``lease_ms`` plus the messages in flight (one per warp).  timeout: seconds (None =
        ``config.shutdown_timeout_s``); past it GpuqError is raised and this pause is undone.
        Raises QueueClosed once ``shutdown()`` or ``close()`` has begun, ConfigError with
        ``lease_ms=math.inf`` (a kernel that never leaves cannot be parked), KernelFault /
        PluginHung once a plugin faulted or hung (also when found while waiting).
        """
        timeout = self.config.shutdown_timeout_s if timeout is None else check_seconds("timeout", timeout)
        if self.closed:
            raise QueueClosed("queue is closed")
        self._leases.pause(timeout)

    def resume(self) -> None:
        """Undo one ``pause()``; once none is in force the next lease is launched and serves what
        waited.  Without a pause in force it does nothing.  Raises QueueClosed after ``close()``,
        CudaError."""
        if self.closed:
            raise QueueClosed("queue is closed")
        self._leases.resume()

    @contextlib.contextmanager
    def paused(self, timeout: float | None = None):
        """``with q.paused(): ...`` runs the block with the kernel parked (``pause``), then undoes
        that pause.  Blocks nest; if the pause fails (timeout) or is interrupted (Ctrl-C while it
        waits or as it returns), nothing is left paused."""
        timeout = self.config.shutdown_timeout_s if timeout is None else check_seconds("timeout", timeout)
        if self.closed:
            raise QueueClosed("queue is closed")
        in_force: list = []  # Leases.pause appends to it once the pause is in force
        try:
            self._leases.pause(timeout, in_force)
            yield self
        finally:
            if in_force and not self.closed:
                self.resume()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting messages and stop the kernel; return once it has exited.

        drain=True (default): the kernel first processes every message already enqueued, so each
        one's result can still be taken (until ``close()``).  drain=False: it stops as soon as
        possible; unprocessed messages get no result.  A producer waiting for a free slot gets
        QueueClosed at once.  Calling it again (e.g. after an interrupt) waits again; drain=False
        on a later call turns a drain into an abort.  timeout: seconds (None =
        ``config.shutdown_timeout_s``); past it the kernel is aborted and GpuqError is raised.  It
        counts from when the producer lock is held: a reservation another thread holds open is
        waited for first, without a bound (``close()`` too: freeing the ring under it is unsafe).
        Raises KernelFault / PluginHung if a plugin faulted or hung (before or while it waits: the
        kernel cannot be stopped then; ``close()`` still releases what it can), ProtocolError if
        the device reported a broken slot during the queue's life, QueueClosed after ``close()``.
        """
        timeout = self.config.shutdown_timeout_s if timeout is None else check_seconds("timeout", timeout)
        self._accepting = False  # waiting producers see it and leave, releasing _plock
        with self._clock:  # consumers move _limit under _clock, and only while accepting
            self._limit = -1
        with self._plock:
            if self._doorbell is None:
                raise QueueClosed("queue is closed")
            mode = STOP_DRAIN if drain else STOP_ABORT
            if self._stop_mode is None or mode > self._stop_mode:
                self._stop_mode = mode
                # the producers' head, not the doorbell's: every enqueued message is covered
                self._doorbell[0] = self._head | (mode << DOORBELL_STOP_SHIFT)
        k, leases = self._kernel, self._leases
        leases.stop()  # pauses lifted, none accepted from now on; the loop below launches
        deadline = time.monotonic() + timeout
        while not k.exited():
            leases.check()
            if not leases.serving():  # a lease that ended before it saw the stop: one more sees it
                leases.kick()
            if time.monotonic() > deadline:
                with self._plock:
                    self._stop_mode = STOP_ABORT
                    self._doorbell[0] = self._head | (STOP_ABORT << DOORBELL_STOP_SHIFT)
                raise GpuqError(
                    f"the kernel did not drain within {timeout} s; aborted "
                    f"({self._head - int(self._counters.sum())} messages unprocessed)"
                )
            time.sleep(1e-4)
        code, msg_id = k.error
        if code:
            raise ProtocolError(f"device reported {ERROR_NAMES.get(code, code)} at msg_id {msg_id}")

    def close(self) -> None:
        """Shut down (draining) if needed, then free all GPU and pinned memory.  Idempotent.

        Results not taken are gone after this; every later call raises QueueClosed.  A reservation
        the calling thread holds open is cancelled first (``shutdown`` raises GpuqError instead;
        another thread's is waited for, as by ``shutdown``).  Errors of
        the shutdown (GpuqError, ProtocolError, and KernelFault / PluginHung found during it)
        propagate; the memory is freed all the same (or, if the kernel cannot be stopped,
        deliberately leaked and the device kept marked busy).  After a fault or hang found before
        it, close neither shuts down nor raises (the failure was raised to the waiters, warned of,
        and stays in ``stats().fault``): it frees what a lost context still lets it free
        (errors ignored: the memory goes with the context), or, after a hang, nothing, with a
        RuntimeWarning (cuMemFree would wait behind the running kernel for ever); it never waits
        for the kernel then.
        """
        if self.closed:
            return
        self._cancel_own_reservation()
        try:
            if self._leases.failure is None:
                self.shutdown(drain=self._stop_mode != STOP_ABORT)
        finally:
            with self._plock, self._clock:
                self._forget_memory()
            self._finalizer()

    def _forget_memory(self) -> None:
        """Drop every view of the shared memory (callers hold both locks): later calls raise QueueClosed."""
        self._accepting = False
        self._limit = -1
        self._res_hdr = self._req_hdr = self._req_hdr32 = self._res_data = self._req_data = self._doorbell = None
        self._counters = np.zeros(1, np.uint64)

    def _abandon(self) -> None:
        """At interpreter exit: stop the kernel and make every later call raise QueueClosed, but
        free nothing (a daemon thread may still be inside a call; process teardown frees it)."""
        if self.closed:
            return
        self._accepting = False  # a producer waiting for a slot leaves and releases _plock
        self._limit = -1
        got = [lock for lock in (self._plock, self._clock) if lock.acquire(timeout=1.0)]
        try:
            self._forget_memory()
        finally:
            for lock in got:
                lock.release()
        self._leases.close()
        self._finalizer.detach()
        self._kernel.abandon(0.0 if isinstance(self._leases.failure, PluginHung) else 2.0)

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run (or the queue was garbage-collected)."""
        return not self._finalizer.alive

    def __enter__(self) -> GpuQueue:
        """The started queue itself; QueueClosed if it was closed already."""
        if self.closed:
            raise QueueClosed("queue is closed: a closed queue cannot be used again")
        return self

    def __exit__(self, *exc) -> None:
        """``close()``: drains what is queued, also when the block raised, then frees everything."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "shut down" if self._stop_mode is not None else "running"
        return f"<GpuQueue {self._kernel.backend} capacity={self._cap} slot_bytes={self._sb} {state}>"


def _close_kernel(leases: Leases, kernel: Backend) -> None:
    """close() and garbage collection: no launch from now on, then stop the kernel and free it
    (after a hang, free nothing and do not wait: the kernel will never stop)."""
    leases.close()
    kernel.close(0.0 if isinstance(leases.failure, PluginHung) else 5.0)


_open_queues: weakref.WeakSet[GpuQueue] = weakref.WeakSet()


@atexit.register
def _abandon_open_queues() -> None:
    """Interpreter exit: every queue not closed is stopped and emptied of views, never freed.
    (Non-daemon threads have finished by now; daemon threads may still be inside a call.)"""
    for q in list(_open_queues):
        try:
            q._abandon()
        except Exception:  # exit must go on
            pass
