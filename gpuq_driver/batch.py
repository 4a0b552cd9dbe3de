"""BatchProcessor: the plugin over a batch of messages, one kernel launch per batch.

Per batch: the payloads are packed into fixed slots of pinned host memory, one H2D copy moves
lengths and slots, one launch of ``gpuq_batch`` (device_src/gpuq_batch.cu: one warp per message,
the same ``gpuq_process`` plugin the persistent kernel runs) processes them, one D2H copy brings
lengths and results back, all on one CU_STREAM_NON_BLOCKING stream, then one stream sync.
Where no GPU exists (or ``backend="numpy"``) the same plugin's Python twin runs over NumPy views
of the same packed layout (:mod:`gpuq_driver.plugins`).  The plugin's per-processor parameters
(``params=``, params.py) are uploaded to VRAM once, when it is built.  A message the plugin fails
(``GPUQ_FAIL(code)``, or a twin's ``plugins.Fail(code)``) gets no result: ``process`` raises
MessageFailed after the whole batch ran, carrying every result and every failure's code.

The batch engine beside GpuQueue (no Redis in it): Track A's StreamWorker (gpuq_driver.streams)
uses it as its GPU step, and ``benchmarks/`` as the launch-per-batch baseline.

Do not run a BatchProcessor's batches on a device while a GpuQueue's persistent kernel runs
there in the same process; create it first or after (see docs/design.md).

Faults (docs/api.md, "Faults"): a plugin that traps or reads a bad address makes the batch raise
KernelFault (the CUDA context is lost for the whole process; on the NumPy path: the twin raised);
one that never returns makes it raise PluginHung once the batch has run ``watchdog_ms`` (the wait
polls ``cuStreamQuery`` instead of blocking in ``cuStreamSynchronize``, which would never return).
Either way the processor is stopped for good: every later batch raises the same error.
"""

from __future__ import annotations

import copy
import ctypes
import math
import time
import warnings
import weakref

import numpy as np

from .errors import (
    ConfigError,
    CudaError,
    GpuqError,
    KernelStopped,
    MessageFailed,
    PayloadError,
    PluginHung,
    check_int,
    check_number,
    kernel_fault,
    plugin_hung,
)
from .layout import check_slot_bytes, check_threads_per_block
from .params import check_params, describe
from .payload import byte_view, byte_views, lengths_array
from .plugins import FAIL_BIT, MAX_FAIL_CODE, Fail, Plugin, resolve

_LENS_ALIGN = 256

FAILED = 0xFFFFFFFF
"""The result length that marks a message with no result: its payload was larger than a slot (it
did not run), the plugin returned more than ``slot_bytes`` (gpuq_batch.cu's out_len), or the
plugin failed it (``GPUQ_FAIL(code)``; ``process_packed(..., fail_codes=True)`` gives the code)."""


class BatchProcessor:
    """Runs the plugin over batches of up to ``max_batch`` messages of up to ``slot_bytes`` bytes.

    slot_bytes:         bytes per slot, a multiple of 16 (default 512); payloads and results are
                        at most this long.
    max_batch:          messages per :meth:`process` call (default 4096); pinned + device memory
                        is about 2 × max_batch × slot_bytes each.
    plugin:             the processing function: a name ("echo" (default), "crc32c", "score", an
                        entry point) or a ``gpuq_driver.plugins.Plugin``; the NumPy path runs its twin.
    backend:            "cuda", "numpy", or "auto" (cuda where a GPU is usable, else numpy).
    threads_per_block:  block size of the launch (default 256; one warp per message).
    device:             CUDA device ordinal (default 0).
    params:             the plugin's parameters, as QueueConfig's ``params`` (any C-contiguous
                        bytes-like object, 0 .. 1 GiB; None = none): copied now, uploaded to VRAM
                        once (cuda), freed by ``close()``.
    watchdog_ms:        the longest one batch may run on the GPU (default 5,000 ms, as
                        QueueConfig's; 1 .. 3,600,000, or ``math.inf``: wait for ever, in
                        ``cuStreamSynchronize``); past it the plugin is taken to never return and
                        ``process`` raises PluginHung.  The NumPy path runs the twin in the calling
                        thread and cannot bound it.

    Raises ConfigError for a bad field (params larger than the free VRAM too), CudaError /
    CompileError from the GPU set-up.
    """

    def __init__(
        self,
        slot_bytes: int = 512,
        max_batch: int = 4096,
        plugin: str | Plugin = "echo",
        backend: str = "auto",
        threads_per_block: int = 256,
        device: int = 0,
        params=None,
        watchdog_ms: float = 5000.0,
    ):
        slot_bytes = check_slot_bytes(slot_bytes)  # the queue's rule (layout.py)
        self.params = check_params(params)
        check_int("max_batch", max_batch, 1, 1 << 20)
        threads_per_block = check_threads_per_block(threads_per_block)
        self.watchdog_ms = check_number(
            "watchdog_ms", watchdog_ms, 1.0, 3_600_000.0, " of milliseconds", allow_inf=True
        )
        self._device = device
        self._failure: KernelStopped | None = None  # KernelFault / PluginHung: stopped for good
        if backend not in ("auto", "cuda", "numpy"):
            raise ConfigError(f"backend={backend!r} must be 'auto', 'cuda' or 'numpy'")
        if backend == "auto":
            from .driver import device_count
            from .errors import CudaUnavailable

            try:
                backend = "cuda" if device_count() > device else "numpy"
            except CudaUnavailable:
                backend = "numpy"
        self.plugin = resolve(plugin, "BatchProcessor's NumPy path (backend='numpy')" if backend == "numpy" else None)
        self.slot_bytes, self.max_batch, self.backend = slot_bytes, max_batch, backend
        self.threads_per_block = threads_per_block
        self.batches = self.messages = 0
        self._lens_bytes = -(-4 * max_batch // _LENS_ALIGN) * _LENS_ALIGN
        size = self._lens_bytes + max_batch * slot_bytes  # [lengths | slots], the same for in and out
        if backend == "numpy":
            self._params_view = memoryview(self.params)
            self._host_in, self._host_out = bytearray(size), bytearray(size)
            self._close = lambda: None
        else:
            self._init_cuda(size, device)
        self._finalizer = weakref.finalize(self, self._close)
        # cast: a ctypes array's memoryview has format "<B", which slice assignment refuses
        self._in = memoryview(self._host_in).cast("B")
        self._out = memoryview(self._host_out).cast("B")
        self._in_lens = np.frombuffer(self._in, np.uint32, max_batch)
        self._out_lens = np.frombuffer(self._out, np.uint32, max_batch)
        self._in_slots = np.frombuffer(self._in, np.uint8, max_batch * slot_bytes, self._lens_bytes).reshape(
            -1, slot_bytes
        )
        self._out_slots = np.frombuffer(self._out, np.uint8, max_batch * slot_bytes, self._lens_bytes).reshape(
            -1, slot_bytes
        )

    def _init_cuda(self, size: int, device: int) -> None:
        from . import driver
        from .compiler import CompileOptions, compile_cubin
        from .params import upload

        self._ctx = ctx = driver.primary_context(device)
        arch = driver.device_info(device).arch
        self._module = driver.Module(ctx, compile_cubin("gpuq_batch.cu", CompileOptions(arch=arch, plugin=self.plugin)))
        self._kernel = self._module.function("gpuq_batch")
        self._stream = driver.Stream(ctx)
        self._pinned = driver.MappedHostBuffer(ctx, 2 * size)
        self._dev = driver.DeviceBuffer(ctx, 2 * size)
        self._params_buf = upload(ctx, self._module, self._stream, self.params, device)
        self._size = size
        self._host_in = (ctypes.c_ubyte * size).from_address(self._pinned.host_ptr)
        self._host_out = (ctypes.c_ubyte * size).from_address(self._pinned.host_ptr + size)
        per_sm = driver.max_active_blocks(self._kernel, self.threads_per_block)
        self._max_grid = max(1, per_sm * driver.device_info(device).sm_count)
        resources = (self._stream, self._pinned, self._dev, self._module) + (
            (self._params_buf,) if self._params_buf is not None else ()
        )
        # after a hang nothing is freed: cuMemFree and cuModuleUnload would wait behind the kernel for ever
        self._hung = hung = [False]  # a list, not self: the finalizer must not keep the processor alive
        self._close = lambda: None if hung[0] else [r.close() for r in resources]

    def process(self, payloads) -> list:
        """Results of ``payloads`` (a sequence of bytes-like, at most ``max_batch``), in order:
        bytes, or None where the plugin's result did not fit in a slot.

        Raises PayloadError (naming the message's index, size and ``slot_bytes``) before
        anything runs if a payload is larger than a slot, PayloadTypeError for one that is not
        plain bytes (payload.byte_view: the check every entry point shares); PayloadError (a
        ValueError) for more than ``max_batch`` payloads.  MessageFailed, after the whole batch
        ran, if the plugin failed one or more messages: it names the first (``.msg_id`` is its
        index, ``.code``), and carries ``.results`` (this list, None at the failed ones) and
        ``.failures`` ({index: code}).  KernelFault if the plugin faulted (the CUDA context is
        lost; the NumPy path: its twin raised), PluginHung if the batch ran longer than ``watchdog_ms`` (the
        plugin does not return): from then on every batch raises the same error.
        """
        views = byte_views(payloads, "process([payload])")
        for i, v in enumerate(views):
            if len(v) > self.slot_bytes:
                raise PayloadError(
                    f"payload {i} is {len(v)} bytes; slot_bytes is {self.slot_bytes} (the limit per message)"
                )
        lens = np.fromiter(map(len, views), np.uint32, len(views))
        out_lens, out, codes = self.process_packed(lens, b"".join(views), fail_codes=True)
        results, start = [], 0
        for m in out_lens.tolist():
            results.append(None if m == FAILED else bytes(out[start : start + m]))
            start += 0 if m == FAILED else m
        failed = np.flatnonzero(codes >= 0)
        if len(failed):
            failures = dict(zip(failed.tolist(), codes[failed].tolist()))
            first = int(failed[0])
            raise MessageFailed(first, failures[first], self.plugin.name, results, failures)
        return results

    def process_packed(self, lens, data, fail_codes: bool = False) -> tuple:
        """The batch as sizes + bytes back to back, in and out (no Python object per message).

        lens:  n <= max_batch message sizes in bytes (uint32-convertible);
        data:  the n messages' bytes back to back (bytes-like of ``sum(lens)`` bytes).
        Returns (result sizes, uint32 array of n; FAILED where the message was larger than a
        slot, so it did not run, its result did not fit, or the plugin failed it; the results back
        to back, a memoryview of new bytes), and with ``fail_codes=True`` a third item: an int32
        array of n, the plugin's failure code (0 .. 65535) where it failed the message, -1
        elsewhere.  Raises nothing for failed messages; PayloadTypeError (a TypeError) for ``lens``
        that are not a 1-D array of integers or ``data`` that is not C-contiguous bytes-like,
        PayloadError (a ValueError) for a negative size or one above 0xFFFFFFFF, sizes that do not
        add up to ``data``, or more than ``max_batch`` messages; KernelFault, PluginHung as
        ``process``.
        """
        if not self._finalizer.alive:
            raise GpuqError("BatchProcessor is closed: its memory has been freed")
        if self._failure is not None:
            raise copy.copy(self._failure)
        # a size above slot_bytes is no error here: that message is FAILED (it does not run)
        lens = lengths_array(lens, None, 0xFFFFFFFF, "the uint32 limit", "lens")
        n, sb = len(lens), self.slot_bytes
        if n > self.max_batch:
            raise PayloadError(f"{n} messages; max_batch is {self.max_batch} (the limit per batch)")
        src = np.frombuffer(byte_view(data, "data"), np.uint8)
        if int(lens.sum(dtype=np.int64)) != len(src):
            raise PayloadError(f"lens add up to {int(lens.sum(dtype=np.int64))} bytes, data has {len(src)}")
        fits = lens <= sb
        self._in_lens[:n] = np.where(fits, lens, 0)
        first = int(lens[0]) if n else 0
        if n and first <= sb and (lens == first).all():  # equal sizes: one strided copy
            self._in_slots[:n, :first] = src.reshape(n, first)
        else:
            ends = np.cumsum(lens, dtype=np.int64).tolist()
            for i, (m, end) in enumerate(zip(lens.tolist(), ends)):
                if m <= sb:
                    self._in_slots[i, :m] = src[end - m : end]
        if n:
            try:
                self._run(n)
            except Exception as exc:
                fault = self._fault(exc, n)
                if fault is None:
                    raise
                raise fault from exc
        self.batches += 1
        self.messages += n
        raw = self._out_lens[:n]
        failed = fits & (raw != FAILED) & (raw >= FAIL_BIT)  # FAIL_BIT | code (gpuq_batch.cu)
        out_lens = np.where(fits & ~failed, raw, FAILED).astype(np.uint32)
        first = int(out_lens[0]) if n else 0
        if n and first != FAILED and (out_lens == first).all():
            out = self._out_slots[:n, :first].tobytes()
        else:
            out = b"".join(self._out_slots[i, :m].tobytes() for i, m in enumerate(out_lens.tolist()) if m != FAILED)
        if fail_codes:
            # int32 on both sides: numpy >= 2.5 refuses -1 as a uint32
            codes = np.where(failed, (raw & MAX_FAIL_CODE).astype(np.int32), np.int32(-1))
            return out_lens, memoryview(out), codes
        return out_lens, memoryview(out)

    def _run(self, n: int) -> None:
        sb, lb = self.slot_bytes, self._lens_bytes
        if self.backend == "numpy":
            src, dst = self._in[lb:], self._out[lb:]
            run, params = self.plugin.run_twin, self._params_view
            for i, m in enumerate(self._in_lens[:n].tolist()):
                try:
                    r = run(src[i * sb : i * sb + m], i, params, sb)
                except Fail as exc:  # as GPUQ_FAIL(code) in gpuq_batch.cu's out_len
                    self._out_lens[i] = FAIL_BIT | exc.code
                    continue
                if len(r) > sb:
                    self._out_lens[i] = FAILED
                else:
                    self._out_lens[i] = len(r)
                    dst[i * sb : i * sb + len(r)] = r
            return
        from . import driver

        used = lb + n * sb
        host, dev, size = self._pinned.host_ptr, self._dev.ptr, self._size
        driver.copy_htod_async(dev, host, used, self._stream)
        warps_per_block = self.threads_per_block // 32
        grid = min(self._max_grid, -(-n // warps_per_block))
        args = [
            ctypes.c_uint64(dev + lb),
            ctypes.c_uint64(dev),
            ctypes.c_uint64(dev + size + lb),
            ctypes.c_uint64(dev + size),
            ctypes.c_uint32(n),
            ctypes.c_uint32(sb),
            ctypes.c_uint64(0),
        ]
        driver.launch(self._kernel, grid, self.threads_per_block, args, self._stream)
        driver.copy_dtoh_async(host + size, dev + size, used, self._stream)
        self._wait(n)

    def _wait(self, n: int) -> None:
        """Wait for the batch on the stream, at most ``watchdog_ms``: cuStreamQuery, spinning
        (yielding the GIL) for the first 10 ms as cuStreamSynchronize would, then sleeping up to
        1 ms between looks.  Raises PluginHung past the watchdog, CudaError from the stream."""
        stream = self._stream
        if math.isinf(self.watchdog_ms):
            stream.synchronize()
            return
        limit, start, pause = self.watchdog_ms / 1e3, time.perf_counter(), 0.0
        while not stream.done():
            waited = time.perf_counter() - start
            if waited >= limit:
                self._failure = plugin_hung(
                    self.plugin.name, self._device, waited, self.watchdog_ms, batch=self.batches, messages=n
                )
                self._hung[0] = True
                raise copy.copy(self._failure)
            if waited > 10e-3:
                pause = min(1e-3, pause * 2 or 1e-5)
            if waited > 100e-6:
                time.sleep(pause)

    def _fault(self, exc: Exception, n: int) -> KernelStopped | None:
        """What ``exc`` from batch ``self.batches`` (n messages) means: the processor's failure
        (recorded: every later batch raises it too), or None for an ordinary error.  A CudaError
        while the stream reports one too is a lost context (KernelFault); on the NumPy path any
        error of the twin is its fault, as the simulator's."""
        if isinstance(exc, KernelStopped):
            return None  # PluginHung, recorded by _wait
        if self.backend == "numpy":  # the twin raised (nothing else in _run does)
            cause, device = repr(exc), None
        else:
            if not isinstance(exc, CudaError):
                return None
            try:
                self._ctx.make_current()  # the failed call may have been this thread's first
                self._stream.done()
                return None  # the stream is fine: an ordinary error of one call
            except CudaError:
                pass
            cause, device = str(exc), self._device
        self._failure = kernel_fault(cause, self.plugin.name, device, batch=self.batches, messages=n)
        return copy.copy(self._failure)

    def close(self) -> None:
        """Free the stream, pinned and device memory and the module.  Idempotent.  After a fault
        (a lost context) the driver's errors are ignored: the memory goes with the context.  After
        a hang nothing is freed (cuMemFree would wait behind the running kernel for ever), with a
        RuntimeWarning: the process frees it at exit."""
        if self._finalizer.alive and isinstance(self._failure, PluginHung):
            warnings.warn(
                "gpuq_driver: BatchProcessor's kernel is still running (a plugin that never returns), so its memory "
                "is not freed (cuMemFree would wait behind the kernel for ever); the process frees it at exit",
                RuntimeWarning,
                stacklevel=2,
            )
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> BatchProcessor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        params = f" params={describe(self.params)}" if self.params else ""
        return (
            f"<BatchProcessor {self.backend} plugin={self.plugin.name}{params} slot_bytes={self.slot_bytes} "
            f"max_batch={self.max_batch}: {self.messages} messages in {self.batches} batches>"
        )
