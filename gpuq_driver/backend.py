"""The backend contract: what GpuQueue (queue.py) and the lease keeper (lease.py) use of the thing
that plays the persistent kernel.

Two classes implement it: kernel.PersistentKernel (``backend="cuda"``, the real kernel) and
sim.SimulatedKernel (``backend="sim"``, a Python thread over the same memory layout), so GpuQueue
runs unchanged on either.  tests/test_backend.py checks that both have every member.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .layout import CtrlDev, HostLayout
from .plugins import Plugin

if TYPE_CHECKING:
    from .device_arrays import DeviceMemory


@runtime_checkable
class Backend(Protocol):
    """One queue's kernel and the memory it shares with the host (built from a QueueConfig)."""

    layout: HostLayout
    """Offsets and sizes of the shared memory's regions (control lines, request and result rings)."""
    mem: memoryview
    """The shared memory, writable, ``layout.nbytes`` bytes: the host reads and writes it in place."""
    doorbell: memoryview
    """One uint64 (``GpuqCtrlHost.doorbell``): the producers' head | stop mode << 56."""
    ctrl: CtrlDev
    """The device's control line (GpuqCtrlDev over ``mem``): kernel state, lease counters, first error."""
    blocks: int
    """Blocks of the grid (the simulator: 1)."""
    threads: int
    """Threads per block (the simulator: 32)."""
    warps: int
    """Worker warps, ``blocks * threads // 32`` (the simulator: 1)."""
    backend: str
    """``"cuda"`` or ``"sim"``, as QueueStats reports it."""
    plugin: Plugin
    """The plugin it runs (resolved): MessageFailed names it."""
    dmem: DeviceMemory
    """Its device memory for device arrays (device_arrays.CudaMemory; the simulator: SimMemory): the
    VRAM slot ring's and the VRAM result ring's addresses, 2-D copies, waits on one stream."""

    def start(self) -> None:
        """Get ready for the first lease (zero the device state; the simulator starts its thread)."""

    def launch(self) -> None:
        """Queue one lease behind those already launched; callable from any thread.  The caller
        (lease.Leases) serialises launches.  Raises CudaError."""

    def idle(self) -> bool:
        """True when no launched lease is still running or queued (no wait).  Raises KernelFault
        once a lease has faulted (a sticky CUDA error; the simulator: its twin raised)."""

    def exited(self) -> bool:
        """True once the kernel has stopped for good (a lease saw DRAIN or ABORT and returned), or
        was never launched.  Raises KernelFault if it faulted."""

    @property
    def error(self) -> tuple[int, int]:
        """(GPUQ_ERR_* code, msg_id) of the first protocol error the device saw; (0, 0) if none."""

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the kernel (abort) if it still runs, waiting up to ``wait_s`` (0 after a plugin
        hung), then free everything; a kernel that does not stop is left running and its memory
        leaked, with a RuntimeWarning.  Idempotent."""

    def abandon(self, wait_s: float = 2.0) -> None:
        """Interpreter exit: stop the kernel (abort), wait up to ``wait_s`` (0 after a plugin hung),
        free nothing (another thread may still read the shared memory; process teardown frees it)."""
