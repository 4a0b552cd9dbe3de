"""The persistent kernel's host side: build, check the layout, allocate, launch leases, stop, free.

A ``PersistentKernel`` owns every driver resource of one queue: the mapped pinned block that holds
the control lines, the request and result rings (layout.HostLayout), the VRAM slot ring, the
device state, the plugin's parameters (params.py), the stream and the module.  Everything is
allocated and every function handle is taken *before* the first cooperative launch; nothing is
freed while a lease may still run, and nothing at all at interpreter exit (``abandon``): another
thread may still be reading it.

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
from .errors import ConfigError, GpuqError
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

    def __init__(self, config):
        # One persistent queue kernel per device per process: while one runs, another queue's
        # module load or cuMemFree could wait on it forever.
        other = _live.get(config.device)
        if other is not None and other() is not None and not other().closed:
            raise GpuqError(
                f"a GpuQueue is already running on device {config.device} in this process; "
                "close it first (one persistent queue kernel per device per process)"
            )
        self.closed = False
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

        per_sm = driver.max_active_blocks(self._fn, config.threads_per_block)
        limit = per_sm * info.sm_count
        if limit == 0:
            raise ConfigError(
                f"threads_per_block={config.threads_per_block}: not even one block of the queue "
                f"kernel fits on an SM of {info.name}"
            )
        self.blocks = config.blocks if config.blocks is not None else min(info.sm_count, limit)
        if self.blocks > limit:
            raise ConfigError(
                f"blocks={self.blocks}: a cooperative launch of {config.threads_per_block}-thread blocks fits at most "
                f"{limit} blocks on {info.name} ({per_sm} per SM x {info.sm_count} SMs)"
            )
        self.threads = config.threads_per_block
        self.warps = self.blocks * self.threads // 32
        self.layout = HostLayout(config.capacity, config.slot_bytes, self.warps)

        # Everything is allocated before the launch.
        self.stream = driver.Stream(self.ctx)
        self.host = driver.MappedHostBuffer(self.ctx, self.layout.nbytes)
        self.vram = driver.DeviceBuffer(self.ctx, self.layout.vram_bytes)
        self.dev_state = driver.DeviceBuffer(self.ctx, ctypes.sizeof(DevState))
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
            res_data=base + off["res_data"],
            warp_counters=base + off["warp_counters"],
            vram_slots=self.vram.ptr,
            dev=self.dev_state.ptr,
            warp_totals=self.vram.ptr + self.layout.vram_totals_offset,
            lease_ns=config.lease_ns,
            capacity=config.capacity,
            slot_bytes=config.slot_bytes,
            front_backoff_ns=config.front_backoff_ns,
            idle_backoff_ns=config.idle_backoff_ns,
        )
        self._args = driver.LaunchArgs([self.args])
        self.ctrl = CtrlDev.from_buffer(self.mem, off["ctrl_dev"])
        self.doorbell = self.layout.view(self.mem, "ctrl_host", "Q")[:1]
        self._launched = False
        resources = [self.stream, self.host, self.vram, self.dev_state, self.module]
        if self.params_buf is not None:
            resources.append(self.params_buf)
        self._finalizer = weakref.finalize(self, _release, self.doorbell, self.stream, resources)
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

        Callable from any thread (it makes the context current there); ~10 µs of host time.
        The caller (lease.Leases) serialises launches.  Raises CudaError.
        """
        driver.launch(self._fn, self.blocks, self.threads, self._args, self.stream, cooperative=True)
        self._launched = True

    def idle(self) -> bool:
        """True when no launched lease is still running or queued (``cuStreamQuery``)."""
        if not self._launched or self.closed:
            return True
        self.ctx.make_current()
        return self.stream.done()

    @property
    def error(self) -> tuple[int, int]:
        """(GPUQ_ERR_* code, msg_id) of the first protocol error the device saw; (0, 0) if none."""
        return self.ctrl.error, self.ctrl.error_msg_id

    def exited(self) -> bool:
        """True once the kernel has stopped for good (a lease saw DRAIN or ABORT and returned), or
        was never launched.  Raises CudaError if it faulted."""
        if not self._launched or self.closed:
            return True
        return self.ctrl.state == KERNEL_EXITED and self.idle()

    def close(self) -> None:
        """Free every resource, once the kernel has exited (aborting it first if it still runs).

        If the kernel will not stop, its memory is leaked on purpose and ``closed`` stays False,
        so the device stays marked busy for this process.
        """
        if self._finalizer.alive:
            self.closed = bool(self._finalizer())

    def abandon(self, timeout_s: float = 2.0) -> None:
        """Interpreter exit: stop the kernel (abort) and wait up to ``timeout_s`` for it, but free
        nothing: another thread may still read the mapped memory, and process teardown frees it."""
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        try:
            request_stop(self.doorbell, STOP_ABORT)
            deadline = time.monotonic() + timeout_s
            while not self.idle() and time.monotonic() < deadline:
                time.sleep(1e-3)
        except Exception:  # at exit the driver may be going away: nothing more to do
            pass
        self.closed = True


def _release(doorbell, stream, resources) -> bool:
    """Stop the kernel (abort) and free the resources; True when freed, False when leaked
    because the kernel would not stop (freeing under a running kernel can hang)."""
    try:
        request_stop(doorbell, STOP_ABORT)
        stream.ctx.make_current()
        deadline = time.monotonic() + 5.0
        while not stream.done():
            if time.monotonic() > deadline:
                warnings.warn(
                    "gpuq_driver: persistent kernel did not stop; leaking its memory", RuntimeWarning, stacklevel=2
                )
                return False
            time.sleep(1e-3)
    except Exception as exc:
        warnings.warn(
            f"gpuq_driver: cannot stop the persistent kernel ({exc}); leaking its memory", RuntimeWarning, stacklevel=2
        )
        return False
    for r in resources:
        r.close()
    return True
