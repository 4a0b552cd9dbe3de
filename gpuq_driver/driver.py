"""Thin, checked wrappers over the CUDA driver API (``cuda.bindings.driver``).

Everything the queue holds on the GPU is one of these objects: ``Context`` (a device's primary
context, retained once per process and made current in every thread that calls the driver),
``Stream`` (always ``CU_STREAM_NON_BLOCKING``: a blocking stream would wait on the persistent
kernel), ``MappedHostBuffer`` (``cuMemHostAlloc`` with DEVICEMAP, so host and device see the same
bytes), ``DeviceBuffer`` (``cuMemAlloc``) and ``Module`` (a loaded CUBIN).  Each has an idempotent
``close()`` and a ``weakref.finalize`` that frees it if the owner forgets; each keeps its
context alive.  None is freed at interpreter exit: a daemon thread may still be using it then
(a queue's mapped memory, say), and process teardown frees everything anyway.  Every call goes
through :func:`gpuq_driver.errors.check`.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from dataclasses import dataclass

from .errors import CudaError, CudaUnavailable, GpuqError, check

_init_lock = threading.RLock()
_init_pid: int | None = None
_contexts: dict[int, Context] = {}


def _driver():
    from cuda.bindings import driver

    return driver


def init() -> None:
    """``cuInit(0)`` once per process.

    Raises CudaUnavailable where no CUDA driver library can be loaded or no device exists, and
    GpuqError in a process forked after CUDA was initialised (CUDA does not survive fork()).
    Sets ``CUDA_MODULE_LOADING=EAGER`` unless the environment already chose: lazy loading can
    deadlock against a running persistent kernel.
    """
    global _init_pid
    with _init_lock:
        if _init_pid is not None:
            if _init_pid != os.getpid():
                raise GpuqError(
                    "CUDA was initialised in the parent process and this process was forked after "
                    "cuInit; CUDA cannot be used here (start workers with multiprocessing 'spawn')"
                )
            return
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        try:
            driver = _driver()
            result = driver.cuInit(0)
        except Exception as exc:  # cuda.pathfinder.DynamicLibNotFoundError, OSError, ImportError
            raise CudaUnavailable(
                -1, "NO_CUDA_DRIVER", f"no CUDA driver could be loaded ({type(exc).__name__}: {exc})", "cuInit"
            ) from exc
        check(result, "cuInit")
        if check(driver.cuDeviceGetCount(), "cuDeviceGetCount") == 0:
            raise CudaUnavailable(100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected", "cuDeviceGetCount")
        _init_pid = os.getpid()


def driver_version() -> int:
    """The CUDA driver's version as ``cuDriverGetVersion`` gives it (13000 = 13.0); raises CudaUnavailable."""
    init()
    return int(check(_driver().cuDriverGetVersion(), "cuDriverGetVersion"))


def device_count() -> int:
    """Number of CUDA devices; raises CudaUnavailable where there is no driver or device."""
    init()
    return int(check(_driver().cuDeviceGetCount(), "cuDeviceGetCount"))


@dataclass(frozen=True)
class DeviceInfo:
    """What the queue needs to know of a device: ``arch`` is the NVRTC target, e.g. ``"sm_90"``."""

    ordinal: int
    name: str
    major: int
    minor: int
    sm_count: int
    cooperative: bool

    @property
    def arch(self) -> str:
        return f"sm_{self.major}{self.minor}"


def device_info(ordinal: int = 0) -> DeviceInfo:
    """Name, compute capability and SM count of device ``ordinal``.  Raises CudaUnavailable, CudaError."""
    init()
    d = _driver()
    dev = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
    attr = d.CUdevice_attribute

    def get(a):
        return int(check(d.cuDeviceGetAttribute(a, dev), "cuDeviceGetAttribute"))

    name = check(d.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return DeviceInfo(
        ordinal,
        name,
        get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
        get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        bool(get(attr.CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)),
    )


class Context:
    """A device's primary context, retained once per process (see :func:`primary_context`)."""

    def __init__(self, ordinal: int):
        init()
        d = _driver()
        self.ordinal = ordinal
        self.device = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
        self.handle = check(d.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self._finalizer = weakref.finalize(self, _release_primary, self.device)
        self._finalizer.atexit = False  # process teardown releases it, after every thread has stopped

    def make_current(self) -> None:
        """Make this context current in the calling thread (the CUDA context is per thread)."""
        check(_driver().cuCtxSetCurrent(self.handle), "cuCtxSetCurrent")


def _release_primary(device) -> None:
    try:
        _driver().cuDevicePrimaryCtxRelease(device)
    except Exception:
        pass


def primary_context(ordinal: int = 0) -> Context:
    """The process-wide primary context of device ``ordinal``, made current in this thread."""
    init()
    with _init_lock:
        ctx = _contexts.get(ordinal)
        if ctx is None:
            ctx = _contexts[ordinal] = Context(ordinal)
    ctx.make_current()
    return ctx


class _Resource:
    """Base of the freeable resources: ``close()`` is idempotent and also runs at garbage collection."""

    _finalizer: weakref.finalize

    def close(self) -> None:
        """Free the resource (with its context made current); later calls do nothing."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run (or the object was garbage-collected)."""
        return not self._finalizer.alive


def _finalizer(owner, ctx: Context, fn_name: str, handle) -> weakref.finalize:
    """A finalizer that frees ``handle`` with ``fn_name`` at close or collection, never at exit."""
    fin = weakref.finalize(owner, _free, ctx, fn_name, handle)
    fin.atexit = False
    return fin


def _free(ctx: Context, fn_name: str, handle) -> None:
    try:
        ctx.make_current()
        getattr(_driver(), fn_name)(handle)
    except Exception:
        pass  # at interpreter exit the driver may already be gone


class Stream(_Resource):
    """A ``CU_STREAM_NON_BLOCKING`` stream."""

    def __init__(self, ctx: Context):
        d = _driver()
        ctx.make_current()
        self.ctx = ctx
        self.handle = check(d.cuStreamCreate(int(d.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        self._finalizer = _finalizer(self, ctx, "cuStreamDestroy", self.handle)

    def done(self) -> bool:
        """True when all work on the stream has finished (``cuStreamQuery``), from any thread; raises
        CudaError on a fault.  The context is made current only if the query fails without it (as
        ``CooperativeGraph.launch``): one driver call instead of two, and each lets go of the GIL."""
        d = _driver()
        (status,) = d.cuStreamQuery(self.handle)
        if status != d.CUresult.CUDA_SUCCESS and status != d.CUresult.CUDA_ERROR_NOT_READY:
            self.ctx.make_current()  # no context current in this thread, or another one: once more with ours
            (status,) = d.cuStreamQuery(self.handle)
        if status == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check((status,), "cuStreamQuery")
        return True

    def synchronize(self) -> None:
        """Block until the stream's work is done (never while a persistent kernel runs on it).
        Raises CudaError."""
        check(_driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")


class Event(_Resource):
    """A ``CU_EVENT_DISABLE_TIMING`` event: ``record`` it on a stream, then ``synchronize`` waits for
    that stream's work up to the record, and nothing else (never the whole context, which would wait
    behind the persistent kernel)."""

    def __init__(self, ctx: Context):
        d = _driver()
        ctx.make_current()
        self.ctx = ctx
        self.handle = check(d.cuEventCreate(int(d.CUevent_flags.CU_EVENT_DISABLE_TIMING)), "cuEventCreate")
        self._finalizer = _finalizer(self, ctx, "cuEventDestroy", self.handle)

    def record(self, stream_handle: int) -> None:
        """``cuEventRecord`` on the stream with handle ``stream_handle`` (an int; 1 = legacy default)."""
        check(_driver().cuEventRecord(self.handle, stream_handle), "cuEventRecord")

    def synchronize(self) -> None:
        """Block until the work recorded before the event is done.  Raises CudaError."""
        check(_driver().cuEventSynchronize(self.handle), "cuEventSynchronize")


class MappedHostBuffer(_Resource):
    """``nbytes`` of page-locked host memory mapped into the device's address space.

    ``host_ptr`` / ``device_ptr`` are integers; ``view`` is a writable ``memoryview`` (format
    ``B``) over the host side, zero-filled at allocation.  Loads and stores through ``view`` are
    plain CPU memory accesses: no driver call, no copy.
    """

    def __init__(self, ctx: Context, nbytes: int):
        d = _driver()
        ctx.make_current()
        self.ctx, self.nbytes = ctx, int(nbytes)
        flags = d.CU_MEMHOSTALLOC_DEVICEMAP | d.CU_MEMHOSTALLOC_PORTABLE
        self.host_ptr = int(check(d.cuMemHostAlloc(self.nbytes, flags), "cuMemHostAlloc"))
        self._finalizer = _finalizer(self, ctx, "cuMemFreeHost", self.host_ptr)
        self.device_ptr = int(check(d.cuMemHostGetDevicePointer(self.host_ptr, 0), "cuMemHostGetDevicePointer"))
        self.view = memoryview((ctypes.c_ubyte * self.nbytes).from_address(self.host_ptr)).cast("B")
        ctypes.memset(self.host_ptr, 0, self.nbytes)


class DeviceBuffer(_Resource):
    """``nbytes`` of device memory (``cuMemAlloc``); ``ptr`` is the device address."""

    def __init__(self, ctx: Context, nbytes: int):
        d = _driver()
        ctx.make_current()
        self.ctx, self.nbytes = ctx, int(nbytes)
        self.ptr = int(check(d.cuMemAlloc(self.nbytes), "cuMemAlloc"))
        self._finalizer = _finalizer(self, ctx, "cuMemFree", self.ptr)


class Module(_Resource):
    """A loaded CUBIN.  ``function(name)`` returns a ``CUfunction`` handle, cached by name.

    Get every handle you will need before launching a persistent kernel: loading code while one
    runs can deadlock.
    """

    def __init__(self, ctx: Context, cubin: bytes):
        ctx.make_current()
        self.ctx = ctx
        self.handle = check(_driver().cuModuleLoadData(cubin), "cuModuleLoadData")
        self._finalizer = _finalizer(self, ctx, "cuModuleUnload", self.handle)
        self._functions: dict[str, object] = {}

    def function(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = check(
                _driver().cuModuleGetFunction(self.handle, name.encode()), f"cuModuleGetFunction({name})"
            )
        return fn

    def global_ptr(self, name: str) -> tuple[int, int]:
        """(device address, size in bytes) of the module's ``__device__`` variable ``name``
        (``cuModuleGetGlobal``).  Raises CudaError (CUDA_ERROR_NOT_FOUND where there is none)."""
        self.ctx.make_current()
        ptr, size = check(_driver().cuModuleGetGlobal(self.handle, name.encode()), f"cuModuleGetGlobal({name})")
        return int(ptr), int(size)


def mem_get_info(ctx: Context) -> tuple[int, int]:
    """(free, total) bytes of device memory (``cuMemGetInfo``) of ``ctx``'s device.  Raises CudaError."""
    ctx.make_current()
    free, total = check(_driver().cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)


def max_active_blocks(function, threads_per_block: int, shared_bytes: int = 0) -> int:
    """Blocks of ``threads_per_block`` one SM can hold for ``function`` (cooperative-launch limit per SM)."""
    return int(
        check(
            _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(function, threads_per_block, shared_bytes),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )
    )


class LaunchArgs:
    """Kernel arguments (ctypes values, in order) packed once for launches repeated many times.

    The driver copies the values at each launch, so a value changed in place applies to the
    launches that follow.
    """

    def __init__(self, args: list[ctypes._SimpleCData | ctypes.Structure]):
        self.values = list(args)
        self._ptrs = (ctypes.c_void_p * max(1, len(self.values)))(*[ctypes.addressof(a) for a in self.values])
        self.address = ctypes.addressof(self._ptrs)


def launch(
    function,
    grid: int,
    block: int,
    args: list[ctypes._SimpleCData | ctypes.Structure] | LaunchArgs,
    stream: Stream,
    cooperative: bool = False,
    shared_bytes: int = 0,
) -> None:
    """Launch ``function`` on ``stream`` with a 1-D grid; ``args`` are ctypes values, in order
    (or a :class:`LaunchArgs`).

    ``cooperative=True`` uses ``cuLaunchCooperativeKernel``: every block is resident at once, which
    the caller must have checked against :func:`max_active_blocks` × SM count.  The argument
    values are copied by the driver during the call.  Makes the stream's context current in the
    calling thread.  Raises CudaError.
    """
    d = _driver()
    stream.ctx.make_current()
    packed = args if isinstance(args, LaunchArgs) else LaunchArgs(args)
    if cooperative:
        result = d.cuLaunchCooperativeKernel(
            function, grid, 1, 1, block, 1, 1, shared_bytes, stream.handle, packed.address
        )
        check(result, "cuLaunchCooperativeKernel")
    else:
        result = d.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, shared_bytes, stream.handle, packed.address, 0)
        check(result, "cuLaunchKernel")


class CooperativeGraph(_Resource):
    """One cooperative launch of ``function`` (1-D grid, ``args`` fixed) as a one-node CUDA graph,
    instantiated once, so that each launch is a ``cuGraphLaunch``.

    Why: on the lent H200 hosts a warm ``cuGraphLaunch`` of such a graph took 2.5-2.9 µs p50 against
    5.0-5.7 for ``cuLaunchCooperativeKernel``, and ``cuCtxSetCurrent`` 0.9-1.6 more
    (``benchmarks/probe_launch.py``, benchmarks/NOTES.md); a lease's launch lands in a round trip.
    The kernel node carries ``CU_LAUNCH_ATTRIBUTE_COOPERATIVE``: every block resident at once, as
    the plain call. The argument values are copied into the node here (values changed later do
    not apply).  Raises
    CudaError where the driver cannot build it (the caller falls back to :func:`launch`).
    """

    def __init__(self, ctx: Context, function, grid: int, block: int, args: LaunchArgs, shared_bytes: int = 0):
        d = _driver()
        ctx.make_current()
        self.ctx = ctx
        p = d.CUDA_KERNEL_NODE_PARAMS()
        p.func, p.gridDimX, p.gridDimY, p.gridDimZ = function, grid, 1, 1
        p.blockDimX, p.blockDimY, p.blockDimZ, p.sharedMemBytes = block, 1, 1, shared_bytes
        p.kernelParams = args.address
        graph = check(d.cuGraphCreate(0), "cuGraphCreate")
        try:
            node = check(d.cuGraphAddKernelNode(graph, None, 0, p), "cuGraphAddKernelNode")
            value = getattr(d, "CUkernelNodeAttrValue", d.CUlaunchAttributeValue)()  # the type this call takes
            value.cooperative = 1
            attr = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            check(d.cuGraphKernelNodeSetAttribute(node, attr, value), "cuGraphKernelNodeSetAttribute")
            self.handle = check(d.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            d.cuGraphDestroy(graph)  # the executable graph keeps what it needs
        self._finalizer = _finalizer(self, ctx, "cuGraphExecDestroy", self.handle)

    def launch(self, stream: Stream) -> None:
        """Queue one launch on ``stream`` (``cuGraphLaunch``), from any thread.

        The context is made current only if the call fails without it (a thread that has none, or
        another one current): the call is the common case, and ``cuCtxSetCurrent`` costs as much
        as half of it.  Raises CudaError."""
        d = _driver()
        (status,) = d.cuGraphLaunch(self.handle, stream.handle)
        if status != d.CUresult.CUDA_SUCCESS:
            self.ctx.make_current()
            check(d.cuGraphLaunch(self.handle, stream.handle), "cuGraphLaunch")


def copy_htod_async(dst: int, src_host_ptr: int, nbytes: int, stream: Stream) -> None:
    """``cuMemcpyHtoDAsync`` of ``nbytes`` bytes (src should be pinned for a truly async copy)."""
    check(_driver().cuMemcpyHtoDAsync(dst, src_host_ptr, nbytes, stream.handle), "cuMemcpyHtoDAsync")


def copy_dtoh_async(dst_host_ptr: int, src: int, nbytes: int, stream: Stream) -> None:
    """``cuMemcpyDtoHAsync`` of ``nbytes`` bytes into host memory at ``dst_host_ptr``."""
    check(_driver().cuMemcpyDtoHAsync(dst_host_ptr, src, nbytes, stream.handle), "cuMemcpyDtoHAsync")


def copy_2d_async(
    dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream_handle: int
) -> None:
    """``cuMemcpy2DAsync``: ``height`` rows of ``width`` bytes from ``src`` (rows ``src_pitch`` bytes
    apart) to ``dst`` (rows ``dst_pitch`` apart), on the stream with handle ``stream_handle``.  Both
    addresses are unified (device memory, pinned host memory, managed memory: the driver tells them
    apart).  Raises CudaError."""
    d = _driver()
    unified = d.CUmemorytype.CU_MEMORYTYPE_UNIFIED
    c = d.CUDA_MEMCPY2D()
    c.srcMemoryType, c.srcDevice, c.srcPitch = unified, src, src_pitch
    c.dstMemoryType, c.dstDevice, c.dstPitch = unified, dst, dst_pitch
    c.WidthInBytes, c.Height = width, height
    check(d.cuMemcpy2DAsync(c, stream_handle), "cuMemcpy2DAsync")


def stream_synchronize(stream_handle: int) -> None:
    """``cuStreamSynchronize`` of a stream given by its handle (an int): waits for that stream only."""
    check(_driver().cuStreamSynchronize(stream_handle), "cuStreamSynchronize")


def pointer_memory_type(ptr: int) -> str:
    """What ``ptr`` points at (``cuPointerGetAttribute(MEMORY_TYPE)``): "device", "host", "array" or
    "unified".  Raises CudaError (e.g. for an address the driver does not know)."""
    d = _driver()
    kind = check(
        d.cuPointerGetAttribute(d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr), "cuPointerGetAttribute"
    )
    return {1: "host", 2: "device", 3: "array", 4: "unified"}.get(int(kind), str(kind))


def memset_async(ptr: int, value: int, nbytes: int, stream: Stream) -> None:
    """``cuMemsetD8Async``: fill ``nbytes`` bytes of device memory with ``value``."""
    check(_driver().cuMemsetD8Async(ptr, value, nbytes, stream.handle), "cuMemsetD8Async")


__all__ = [
    "Context",
    "CooperativeGraph",
    "CudaError",
    "DeviceBuffer",
    "DeviceInfo",
    "Event",
    "LaunchArgs",
    "MappedHostBuffer",
    "Module",
    "Stream",
    "copy_2d_async",
    "copy_dtoh_async",
    "copy_htod_async",
    "device_count",
    "device_info",
    "init",
    "launch",
    "max_active_blocks",
    "mem_get_info",
    "memset_async",
    "pointer_memory_type",
    "primary_context",
    "stream_synchronize",
]
