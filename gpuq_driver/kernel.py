"""The persistent kernel's host side: build, check the layout, allocate, launch leases, stop, free.

A ``PersistentKernel`` owns every driver resource of one queue: the mapped pinned block that holds
the control lines, the request and result rings (layout.HostLayout), the VRAM slot ring, the
result ring in VRAM with ``result_memory="device"`` and the streams and event of the device-array
calls (device_arrays.CudaMemory), the device state, the plugin's parameters (params.py), the
stream and the module.  Everything is allocated and every function handle is taken *before* the
first cooperative launch; nothing is freed while a lease may still run, and nothing at all at
interpreter exit (``abandon``): another thread may still be reading it.

It implements the backend contract, backend.Backend, as sim.SimulatedKernel does (so GpuQueue
runs unchanged on either); the contract's members are documented there.
"""

from __future__ import annotations

import ctypes
import time
import warnings
import weakref

from . import driver
from .compiler import CompileOptions, compile_cubin
from .device_arrays import CudaMemory, DeviceMemory
from .errors import ConfigError, CudaError, GpuqError, kernel_fault
from .layout import (
    KERNEL_EXITED,
    STOP_ABORT,
    CtrlDev,
    DevState,
    HostLayout,
    KernelArgs,
    expected_probe,
    request_stop,
)
from .params import upload
from .plugins import Plugin, resolve

_live: dict[int, weakref.ref[PersistentKernel]] = {}
"""device ordinal -> the queue kernel running there in this process (at most one, see __init__)."""


def grid_blocks(blocks: int | None, threads: int, per_sm, sm_count: int, device_name: str) -> int:
    """The queue kernel's grid: ``blocks`` (None = one per SM), checked against a cooperative
    launch's limit, ``per_sm(threads)`` blocks (the kernel's occupancy) × ``sm_count``.  Raises
    ConfigError naming the field and the limit: a block of ``threads`` that does not fit an SM at
    all (the kernel's registers a thread) names the largest threads_per_block that does."""
    fit = per_sm(threads)
    if fit == 0:
        largest = next((t for t in range(threads - 32, 0, -32) if per_sm(t) > 0), 0)
        raise ConfigError(
            f"threads_per_block={threads}: not even one block of the queue kernel fits on an SM of {device_name} "
            f"(it needs more registers a thread than {threads}-thread blocks leave); "
            + (f"threads_per_block <= {largest} fits" if largest else "no block size fits")
        )
    limit = fit * sm_count
    chosen = blocks if blocks is not None else min(sm_count, limit)
    if chosen > limit:
        raise ConfigError(
            f"blocks={chosen}: a cooperative launch of {threads}-thread blocks fits at most "
            f"{limit} blocks on {device_name} ({fit} per SM x {sm_count} SMs)"
        )
    return chosen


class PersistentKernel:
    """``gpuq_persistent``, launched lease after lease, serving a ring of ``capacity`` × ``slot_bytes`` slots.

    ``mem`` is a writable memoryview over the mapped block (``layout.nbytes`` bytes) that the host
    side of the protocol reads and writes directly.  Raises CudaUnavailable (no driver/device),
    ConfigError (grid too large for a cooperative launch, unknown plugin or device), CompileError,
    GpuqError (layout mismatch between host and device, kernel did not start).
    """

    backend = "cuda"
    # backend.Backend's data members, set in _setup
    layout: HostLayout
    mem: memoryview
    doorbell: memoryview
    ctrl: CtrlDev
    blocks: int
    threads: int
    warps: int
    plugin: Plugin
    dmem: DeviceMemory

    def __init__(self, config):
        # One persistent queue kernel per device per process: while one runs, another queue's
        # module load or cuMemFree could wait on it forever.
        other = _live.get(config.device)
        if other is not None and other() is not None and not other().closed:
            if other().stuck:
                raise GpuqError(
                    f"the GpuQueue closed on device {config.device} in this process left a kernel that did not "
                    "stop (a plugin that never returns: PluginHung); it keeps the device until the process exits: "
                    "restart the process"
                )
            raise GpuqError(
                f"a GpuQueue is already running on device {config.device} in this process; "
                "close it first (one persistent queue kernel per device per process)"
            )
        self.closed = False
        self.stuck = False  # closed after a hang: the kernel runs on, its memory is left to the process
        self.device = config.device
        _live[config.device] = weakref.ref(self)
        try:
            self._setup(config)
        except BaseException:
            self.closed = True
            raise

    def _setup(self, config):
        self.ctx = driver.primary_context(config.device) if config.device < driver.device_count() else None
        if self.ctx is None:
            raise ConfigError(f"device={config.device}: this machine has {driver.device_count()} CUDA device(s)")
        self.info = info = driver.device_info(config.device)
        if not info.cooperative:
            raise GpuqError(f"{info.name} does not support cooperative launches")
        self.plugin = resolve(config.plugin)
        cubin = compile_cubin("gpuq_queue.cu", CompileOptions(arch=info.arch, plugin=self.plugin))
        self.module = driver.Module(self.ctx, cubin)
        self._fn = self.module.function("gpuq_persistent")
        probe_fn = self.module.function("gpuq_layout_probe")

        self.blocks = grid_blocks(
            config.blocks,
            config.threads_per_block,
            lambda t: driver.max_active_blocks(self._fn, t),
            info.sm_count,
            info.name,
        )
        self.threads = config.threads_per_block
        self.warps = self.blocks * self.threads // 32
        self.layout = HostLayout(config.capacity, config.slot_bytes, self.warps)

        # Everything is allocated before the launch.
        self.stream = driver.Stream(self.ctx)
        self.host = driver.MappedHostBuffer(self.ctx, self.layout.nbytes)
        self.vram = driver.DeviceBuffer(self.ctx, self.layout.vram_bytes)
        self.dev_state = driver.DeviceBuffer(self.ctx, ctypes.sizeof(DevState))
        # result_memory="device": the result payload ring in VRAM (its headers stay in the mapped block)
        self.res_vram = None
        if config.result_memory == "device":
            self.res_vram = driver.DeviceBuffer(self.ctx, config.capacity * config.slot_bytes)
        self.dmem = CudaMemory(self.ctx, config.device, self.vram.ptr, self.res_vram.ptr if self.res_vram else 0)
        self.mem = self.host.view
        self._check_layout(probe_fn)
        # The plugin's parameters: their own VRAM buffer, and gpuq_params_g pointing at it.
        self.params_buf = upload(self.ctx, self.module, self.stream, config.params, config.device)

        off = self.layout.offsets
        base = self.host.device_ptr
        self.args = KernelArgs(
            ctrl_host=base + off["ctrl_host"],
            ctrl_dev=base + off["ctrl_dev"],
            req_hdr=base + off["req_hdr"],
            req_data=base + off["req_data"],
            res_hdr=base + off["res_hdr"],
            res_data=self.res_vram.ptr if self.res_vram is not None else base + off["res_data"],
            warp_counters=base + off["warp_counters"],
            vram_slots=self.vram.ptr,
            dev=self.dev_state.ptr,
            warp_totals=self.vram.ptr + self.layout.vram_totals_offset,
            lease_ns=config.lease_ns,
            capacity=config.capacity,
            slot_bytes=config.slot_bytes,
            front_backoff_ns=config.front_backoff_ns,
            idle_backoff_ns=config.idle_backoff_ns,
            one_read=int(config.one_read),
            scouts=min(config.scouts, self.warps - 1) if config.one_read else 0,
        )
        self._args = driver.LaunchArgs([self.args])
        # Each lease is a cuGraphLaunch of a one-node cooperative graph (driver.CooperativeGraph: 2.8
        # µs against 6.7 for cuCtxSetCurrent + cuLaunchCooperativeKernel, benchmarks/NOTES.md,
        # thirteenth session); the plain call where the driver cannot build one.
        try:
            self.graph = driver.CooperativeGraph(self.ctx, self._fn, self.blocks, self.threads, self._args)
        except CudaError:
            self.graph = None
        self.ctrl = CtrlDev.from_buffer(self.mem, off["ctrl_dev"])
        self.doorbell = self.layout.view(self.mem, "ctrl_host", "Q")[:1]
        self._launched = False
        self._stop_wait_s = [5.0]  # how long close() waits for the kernel to stop (0 after a hang)
        resources = [self.stream, self.host, self.vram, self.dev_state, self.module, *self.dmem.resources]
        if self.graph is not None:
            resources.insert(0, self.graph)
        if self.res_vram is not None:
            resources.append(self.res_vram)
        if self.params_buf is not None:
            resources.append(self.params_buf)
        self._finalizer = weakref.finalize(self, _release, self.doorbell, self.stream, resources, self._stop_wait_s)
        self._finalizer.atexit = False  # at exit: abandon(), never free (another thread may still read)

    def _check_layout(self, probe_fn) -> None:
        expected = expected_probe()
        out = driver.MappedHostBuffer(self.ctx, 8 * 64)
        try:
            driver.launch(probe_fn, 1, 32, [ctypes.c_uint64(out.device_ptr)], self.stream)
            self.stream.synchronize()
            got = list(out.view.cast("Q")[: len(expected)])
        finally:
            out.close()
        if got != expected:
            raise GpuqError(
                f"device_src/gpuq_layout.cuh and gpuq_driver/layout.py disagree: device {got}, host {expected}"
            )

    def start(self) -> None:
        """Zero the device state (VRAM scalars and per-warp totals) before the first lease."""
        driver.memset_async(self.dev_state.ptr, 0, ctypes.sizeof(DevState), self.stream)
        driver.memset_async(self.vram.ptr + self.layout.vram_totals_offset, 0, self.warps * 8, self.stream)
        self.stream.synchronize()

    def launch(self) -> None:
        """Queue one lease (a cooperative launch of the whole grid) on the queue's stream.

        Callable from any thread (it makes the context current there where it has to); a
        ``cuGraphLaunch``, ~3 µs of host time on the H200 hosts (benchmarks/probe_launch.py).
        The caller (lease.Leases) serialises launches.  Raises CudaError.
        """
        try:
            if self.graph is not None:
                self.graph.launch(self.stream)
            else:
                driver.launch(self._fn, self.blocks, self.threads, self._args, self.stream, cooperative=True)
        except CudaError:  # refused: nothing was queued
            raise
        except BaseException:  # a KeyboardInterrupt in or just after the call: it may be queued
            self._launched = True  # so idle() asks the stream (lease.Leases settles the count)
            raise
        self._launched = True

    def idle(self) -> bool:
        """True when no launched lease is still running or queued (``cuStreamQuery``, no wait).

        Raises KernelFault if the stream reports an error: a lease faulted (a sticky error, e.g.
        CUDA_ERROR_ILLEGAL_ADDRESS; the CUDA context is lost for the whole process)."""
        if not self._launched or self.closed:
            return True
        try:
            return self.stream.done()  # makes the context current where the query needs it
        except CudaError as exc:
            raise kernel_fault(str(exc), self.plugin.name, self.device) from exc

    @property
    def error(self) -> tuple[int, int]:
        """(GPUQ_ERR_* code, msg_id) of the first protocol error the device saw; (0, 0) if none."""
        return self.ctrl.error, self.ctrl.error_msg_id

    def exited(self) -> bool:
        """True once the kernel has stopped for good (a lease saw DRAIN or ABORT and returned), or
        was never launched.  Raises KernelFault if it faulted."""
        if not self._launched or self.closed:
            return True
        return self.ctrl.state == KERNEL_EXITED and self.idle()

    def close(self, wait_s: float = 5.0) -> None:
        """Free every resource, once the kernel has exited (aborting it first if it still runs;
        waiting up to ``wait_s`` for that: 0 after a plugin hung).

        If the kernel will not stop (a plugin that never returns), its memory is leaked on purpose,
        with a RuntimeWarning (cuMemFree would wait behind the kernel for ever), and ``closed``
        stays False, so the device stays marked busy for this process.  After a fault (a lost
        context) everything is freed, the driver's errors ignored: the memory goes with the context.
        """
        if self._finalizer.alive:
            self._stop_wait_s[0] = wait_s
            self.closed = bool(self._finalizer())
            self.stuck = not self.closed

    def abandon(self, wait_s: float = 2.0) -> None:
        """Interpreter exit: stop the kernel (abort) and wait up to ``wait_s`` for it (0 after a
        plugin hung), but free nothing: another thread may still read the mapped memory, and
        process teardown frees it."""
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        try:
            request_stop(self.doorbell, STOP_ABORT)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not self.idle():
                time.sleep(1e-3)
        except Exception:  # at exit the driver may be going away, or the context is lost: nothing more to do
            pass
        self.closed = True


def _release(doorbell, stream, resources, wait_s) -> bool:
    """Stop the kernel (abort) and free the resources; True when freed, False when leaked
    because the kernel would not stop within ``wait_s[0]`` seconds (freeing under a running kernel
    can hang).  A stream that reports an error (a fault: the context is lost) has no kernel left
    to wait for: everything is freed, the driver's errors ignored (driver._free)."""
    try:
        request_stop(doorbell, STOP_ABORT)
        stream.ctx.make_current()
        deadline = time.monotonic() + wait_s[0]
        while not stream.done():
            if time.monotonic() >= deadline:
                warnings.warn(
                    "gpuq_driver: the persistent kernel is still running (a plugin that never returns?), so its "
                    "memory is not freed (cuMemFree would wait behind the kernel for ever); the process frees it "
                    "at exit",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return False
            time.sleep(1e-3)
    except CudaError:  # the context is lost (a fault): nothing runs any more; free what the driver lets us
        pass
    except Exception as exc:
        warnings.warn(
            f"gpuq_driver: cannot stop the persistent kernel ({exc}); leaking its memory", RuntimeWarning, stacklevel=2
        )
        return False
    for r in resources:
        r.close()
    return True
