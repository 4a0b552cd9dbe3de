"""The CPU simulator: a Python thread plays the persistent kernel over the same memory layout.

``QueueConfig(backend="sim")`` runs GpuQueue's real host code against this, so the whole host side
(enqueue, backpressure, polling, leases and relaunches, pause/resume, shutdown, exit) is tested on
machines without a GPU, as numba-cuda's simulator does for kernels. It follows the device protocol
of gpuq_queue.cu (doorbell, stop before head, result data before header, msg_id last; a lease
announces itself before its first doorbell read, announces that it is leaving when its time is up,
serves what one last read shows, and carries its position over to the next lease) with one
simulated warp and the plugin's Python twin (plugins.py; given the config's params and
``slot_bytes`` as out_cap where it names them), under the device's rules: a twin that raises
plugins.Fail(code) fails the message (DONE, an empty result, the code in the header's flags:
MessageFailed when taken, as GPUQ_FAIL(code) on the device); a result longer than ``slot_bytes``
is a BAD_RESULT protocol error for that message (an empty result, ProtocolError when taken) and is
never written. A thread plays the stream: leases launched while
one runs wait their turn. It is for tests, not for speed: ``blocks`` and ``threads_per_block`` are
ignored (stats report one block of one warp).

Faults as on the device: a twin that raises is a plugin that faults (the lease stops where it was,
its counters frozen, and ``idle()`` / ``launch()`` raise KernelFault from then on, as cuStreamQuery
and every launch do in a lost CUDA context); a twin that never returns is a plugin that hangs (the
lease never ends; the thread, a daemon, stays in the twin and does not block exit).  The lease
keeper's watchdog (lease.py) finds both, as on the GPU.
"""

from __future__ import annotations

import copy
import random
import threading
import time
import warnings

import numpy as np

from .device_arrays import DeviceMemory, SimMemory
from .errors import KernelFault, kernel_fault
from .layout import (
    CHECK_BYTES,
    CHECK_MASK,
    CHECK_SHIFT,
    DOORBELL_HEAD_MASK,
    DOORBELL_STOP_SHIFT,
    ERR_BAD_LEN,
    ERR_BAD_MSG_ID,
    ERR_BAD_RESULT,
    HEADER_BYTES,
    KERNEL_EXITED,
    KERNEL_PARKED,
    KERNEL_RUNNING,
    REQ_CHECKED,
    REQ_IN_VRAM,
    STOP_ABORT,
    STOP_DRAIN,
    CtrlDev,
    HostLayout,
    request_stop,
    result_flags,
    slot_check,
    slot_of,
)
from .plugins import Fail, Plugin, resolve

SIM_NEEDS_TWIN = "the simulator (backend='sim')"


class SimulatedKernel:
    """The backend contract (backend.Backend), as kernel.PersistentKernel; the memory is an ordinary bytearray."""

    backend = "sim"
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
        self.plugin = resolve(config.plugin, SIM_NEEDS_TWIN)
        self.params = memoryview(config.params)  # read-only: the twin cannot change them
        self.config = config
        self.blocks, self.threads, self.warps = 1, 32, 1
        self.layout = HostLayout(config.capacity, config.slot_bytes, self.warps)
        self.mem = memoryview(bytearray(self.layout.nbytes))
        self.ctrl = CtrlDev.from_buffer(self.mem, self.layout.offsets["ctrl_dev"])
        self.doorbell = self.layout.view(self.mem, "ctrl_host", "Q")[:1]
        # "VRAM": the slot ring (enqueue_device writes payloads there) and, with
        # result_memory="device", the result ring; host arrays standing in for device memory
        self.vram = np.zeros(self.layout.vram_bytes, np.uint8)
        self.res_vram = np.zeros(self.layout.sizes["res_data"], np.uint8) if config.result_memory == "device" else None
        self.dmem = SimMemory(self.vram, self.res_vram)
        self.delay_s = 0.0  # tests may slow the simulated device down
        self.tear_rate = 0.0  # tests: the share of one-reads that come back torn (a 16-byte chunk garbled)
        self._rng = random.Random(0)
        self.fault: Exception | None = None  # what a plugin's twin raised (the kernel then stopped)
        self._fault_error: KernelFault | None = None  # what idle() and launch() raise from then on
        self.closed = False
        self._lease_s = config.lease_ms / 1e3
        self._claim = 0  # GpuqDevState.claim: the next msg_id, carried from lease to lease
        self._unchecked = False  # GpuqDevState.unchecked: the last message served had no slot check
        self._queued = 0  # leases launched and not yet finished (the stream's depth)
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._stream, name="gpuq-sim-kernel", daemon=True)

    def start(self) -> None:
        """Start the thread that plays the stream (it runs the leases launched, one after another)."""
        self._thread.start()

    def launch(self) -> None:
        """Queue one lease behind those already launched (kernel.PersistentKernel.launch's twin).
        Raises KernelFault after a fault, as a launch in a lost CUDA context fails."""
        if self._fault_error is not None:
            raise copy.copy(self._fault_error)
        with self._cv:
            self._queued += 1
            self._cv.notify()

    def idle(self) -> bool:
        """True when no launched lease is still running or queued.  Raises KernelFault once a twin
        has raised (the simulated cuStreamQuery of a faulted stream)."""
        if self._fault_error is not None:
            raise copy.copy(self._fault_error)
        return self._queued == 0

    @property
    def error(self) -> tuple[int, int]:
        """(GPUQ_ERR_* code, msg_id) of the first protocol error; (0, 0) if none."""
        return self.ctrl.error, self.ctrl.error_msg_id

    def exited(self) -> bool:
        """True once the simulated kernel has stopped for good (or was never launched)."""
        return self.closed or (self.ctrl.state in (KERNEL_EXITED, 0) and self.idle())

    def close(self, wait_s: float = 5.0) -> None:
        """Abort the running lease and stop the stream thread (waits up to ``wait_s``: 0 after a
        twin hung; a thread still in a twin is left, with a RuntimeWarning, as the GPU's kernel is).
        Idempotent."""
        self._stop(wait_s, warn=True)

    def abandon(self, wait_s: float = 2.0) -> None:
        """Interpreter exit: as ``close``, without the warning (nothing to leave behind: the memory is
        a bytearray, and a thread still in a twin is a daemon)."""
        self._stop(wait_s, warn=False)

    def _stop(self, wait_s: float, warn: bool) -> None:
        if not self.closed:
            request_stop(self.doorbell, STOP_ABORT)
            with self._cv:
                self.closed = True
                self._cv.notify()
            if self._thread.is_alive():
                self._thread.join(wait_s)
                if warn and self._thread.is_alive():
                    warnings.warn(
                        "gpuq_driver simulator: the simulated kernel is still running (a twin that never returns?); "
                        "its thread, a daemon, is left in it",
                        RuntimeWarning,
                        stacklevel=3,
                    )

    def _stream(self) -> None:
        while True:
            with self._cv:
                while not self._queued and not self.closed:
                    self._cv.wait()
                if self.closed:
                    return
            if self.fault is None:  # after a fault, leases still queued end at once
                try:
                    self._lease()
                except Exception as exc:  # the twin raised: the simulated kernel "faults"
                    self._fail(exc)
            with self._cv:
                self._queued -= 1

    def _fail(self, exc: Exception) -> None:
        """A twin raised: stop for good where it was, as a device plugin that faults kills its lease
        (and, on the GPU, loses the CUDA context): the counters stay as they are (no lease end, state
        RUNNING) and ``idle()`` / ``launch()`` raise KernelFault from now on; the lease keeper's
        watchdog finds it and tells every waiter.  The exception is kept in ``fault``."""
        msg_id = int(self.layout.view(self.mem, "warp_counters", "Q")[0])  # one warp: the message it was on
        self.fault = exc
        self._fault_error = kernel_fault(f"{exc!r} at msg_id {msg_id}", self.plugin.name)
        self._fault_error.__cause__ = exc  # the twin's traceback, for whoever is told of the fault

    def _lease(self) -> None:
        lay, mem, sb, cap = self.layout, self.mem, self.config.slot_bytes, self.config.capacity
        doorbell, ctrl = self.doorbell, self.ctrl
        req_hdr, res_hdr = lay.view(mem, "req_hdr", "Q"), lay.view(mem, "res_hdr", "Q")
        req_data, res_data = lay.view(mem, "req_data"), lay.view(mem, "res_data")
        if self.res_vram is not None:  # result_memory="device"
            res_data = memoryview(self.res_vram)
        vram, pitch = memoryview(self.vram), HEADER_BYTES + sb  # the VRAM slots: payload 16 B into each
        counter = lay.view(mem, "warp_counters", "Q")
        process, params = self.plugin.run_twin, self.params
        ctrl.warps = 1
        ctrl.leases_begun = ctrl.leases_ended + 1  # announce, then read the doorbell (the GIL orders both)
        ctrl.state = KERNEL_RUNNING
        start, first = time.monotonic(), True
        seq, idle, stop, final = self._claim, 0, 0, None
        while not self.closed:
            if final is None:
                leaving = not first and time.monotonic() - start >= self._lease_s
                if leaving:  # the lease is over: say so, then one last read (the GIL orders both)
                    ctrl.leases_leaving = ctrl.leases_begun
                first = False
                db = doorbell[0]
                stop, head = db >> DOORBELL_STOP_SHIFT, db & DOORBELL_HEAD_MASK
                if leaving:
                    final = head  # served in this lease, nothing after it
            else:
                head = final
            if stop == STOP_ABORT or (seq >= head and (stop == STOP_DRAIN or final is not None)):
                break
            one = None
            # the front warp's read of the slot, beside the doorbell's, while the last message
            # served was checked (GpuqDevState.unchecked: the polls' hint)
            if final is None and stop == 0 and self.config.one_read:
                ctrl.front = seq  # GpuqCtrlDev.front: the host's hint
                if not self._unchecked:
                    one = self._one_read(seq, req_hdr, req_data)
            if seq >= head and one is None:
                idle += 1
                time.sleep(0 if idle < 100 else min(1e-3, 1e-6 * idle))
                continue
            idle = 0
            if self.delay_s:
                time.sleep(self.delay_s)
            slot = slot_of(seq, cap)
            word, mid, code = req_hdr[2 * slot], req_hdr[2 * slot + 1], 0
            n = word & 0xFFFFFFFF
            if mid != seq:
                code = ERR_BAD_MSG_ID
            elif n > sb:
                code, n = ERR_BAD_LEN, sb
            failed = None  # the plugin's failure code (plugins.Fail), as GPUQ_FAIL(code) on the device
            try:
                if code:
                    out = b""
                elif one is not None:  # served from the front warp's one read
                    out = process(one, seq, params, sb)
                elif (word >> 32) & REQ_IN_VRAM:  # enqueue_device: the payload is in the VRAM slot already
                    out = process(vram[slot * pitch + HEADER_BYTES : slot * pitch + HEADER_BYTES + n], seq, params, sb)
                else:
                    out = process(req_data[slot * sb : slot * sb + n], seq, params, sb)
            except Fail as exc:
                out, failed = b"", exc.code
            if len(out) > sb:  # the plugin broke its contract: nothing is written past the slot
                code, out = ERR_BAD_RESULT, b""
            if code and not ctrl.error:
                ctrl.error_msg_id, ctrl.error = seq, code
            res_data[slot * sb : slot * sb + len(out)] = out
            res_hdr[2 * slot] = len(out) | (result_flags(code, failed) << 32)
            res_hdr[2 * slot + 1] = seq
            self._unchecked = not (word >> 32) & REQ_CHECKED
            seq += 1
            counter[0] = seq
            if one is not None:  # counted once processed (GpuQueue.stats reads it first)
                ctrl.spec_reads += 1
        self._claim = seq
        ctrl.leases_leaving = ctrl.leases_ended + 1
        ctrl.state = KERNEL_EXITED if stop in (STOP_DRAIN, STOP_ABORT) else KERNEL_PARKED
        ctrl.leases_ended += 1  # last, after the state, as end_lease (gpuq_queue.cu)

    def _one_read(self, seq: int, req_hdr, req_data):
        """The front warp's one read of slot ``seq`` (gpuq_layout.cuh, "One read"): its payload if
        the header is msg_id ``seq``'s, checked, at most 64 bytes long, and the check holds over a
        snapshot of it (garbled at ``tear_rate``, as a torn PCIe read); else None (counted in
        spec_retries when the check failed).  The snapshot's bytes are what is served, as on the
        device."""
        slot = slot_of(seq, self.config.capacity)
        word, sb = req_hdr[2 * slot], self.config.slot_bytes
        n, flags = word & 0xFFFFFFFF, word >> 32
        if req_hdr[2 * slot + 1] != seq or not flags & REQ_CHECKED or n > min(sb, CHECK_BYTES):
            return None
        head = bytearray(req_data[slot * sb : slot * sb + min(n, CHECK_BYTES)])
        if self.tear_rate and self._rng.random() < self.tear_rate and head:
            at = self._rng.randrange(0, len(head), 16)
            head[at : at + 16] = self._rng.randbytes(len(head[at : at + 16]))
        if slot_check(head, seq, n) != (flags >> CHECK_SHIFT) & CHECK_MASK:
            self.ctrl.spec_retries += 1
            return None
        return bytes(head)  # the whole payload (n <= 64)
