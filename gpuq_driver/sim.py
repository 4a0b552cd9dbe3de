"""The CPU simulator: a Python thread plays the persistent kernel over the same memory layout.

``QueueConfig(backend="sim")`` runs GpuQueue's real host code against this, so the whole host
side (enqueue, backpressure, polling, shutdown) is tested on machines without a GPU, as
numba-cuda's simulator does for kernels.  It follows the device protocol of gpuq_queue.cu
(doorbell, stop before head, result data before header, msg_id last) with one simulated warp and
the Python twin of each plugin.  It is for tests, not for speed: ``blocks`` and
``threads_per_block`` are ignored (stats report one block of one warp).
"""

from __future__ import annotations

import threading
import time

from .errors import ConfigError
from .layout import (DONE, DOORBELL_HEAD_MASK, DOORBELL_STOP_SHIFT, ERR_BAD_LEN, ERR_BAD_MSG_ID, KERNEL_EXITED,
                     KERNEL_RUNNING, STOP_ABORT, STOP_DRAIN, CtrlDev, HostLayout, request_stop, slot_of)

PLUGINS = {"echo": lambda payload, msg_id: payload}
"""Python twins of device_src/plugins: name -> f(payload: memoryview, msg_id) -> bytes-like."""


class SimulatedKernel:
    """Same interface as kernel.PersistentKernel; the memory is an ordinary bytearray."""

    backend = "sim"

    def __init__(self, config):
        if config.plugin not in PLUGINS:
            raise ConfigError(f"plugin={config.plugin!r}: the simulator has {sorted(PLUGINS)}")
        self.config = config
        self.blocks, self.threads, self.warps = 1, 32, 1
        self.layout = HostLayout(config.capacity, config.slot_bytes, self.warps)
        self.mem = memoryview(bytearray(self.layout.nbytes))
        self._ctrl_dev = CtrlDev.from_buffer(self.mem, self.layout.offsets["ctrl_dev"])
        self.doorbell = self.layout.view(self.mem, "ctrl_host", "Q")[:1]
        self._thread = threading.Thread(target=self._run, name="gpuq-sim-kernel", daemon=True)
        self._started = False
        self.delay_s = 0.0  # tests may slow the simulated device down

    def start(self, timeout_s: float = 10.0) -> None:
        self._started = True
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while self._ctrl_dev.state != KERNEL_RUNNING and time.monotonic() < deadline:
            time.sleep(1e-4)

    @property
    def error(self) -> tuple[int, int]:
        return self._ctrl_dev.error, self._ctrl_dev.error_msg_id

    def exited(self) -> bool:
        return not self._started or not self._thread.is_alive()

    def close(self) -> None:
        if self._started and self._thread.is_alive():
            request_stop(self.doorbell, STOP_ABORT)
            self._thread.join(5.0)

    def _run(self) -> None:
        lay, mem, sb, cap = self.layout, self.mem, self.config.slot_bytes, self.config.capacity
        doorbell = self.doorbell
        req_hdr, res_hdr = lay.view(mem, "req_hdr", "Q"), lay.view(mem, "res_hdr", "Q")
        req_data, res_data = lay.view(mem, "req_data"), lay.view(mem, "res_data")
        counter = lay.view(mem, "warp_counters", "Q")
        process = PLUGINS[self.config.plugin]
        self._ctrl_dev.warps = 1
        self._ctrl_dev.state = KERNEL_RUNNING
        seq, idle = 0, 0
        while True:
            db = doorbell[0]
            stop, head = db >> DOORBELL_STOP_SHIFT, db & DOORBELL_HEAD_MASK
            if stop == STOP_ABORT or (stop == STOP_DRAIN and seq >= head):
                break
            if seq >= head:
                idle += 1
                time.sleep(0 if idle < 100 else min(1e-3, 1e-6 * idle))
                continue
            idle = 0
            if self.delay_s:
                time.sleep(self.delay_s)
            slot = slot_of(seq, cap)
            n, mid, code = req_hdr[2 * slot] & 0xFFFFFFFF, req_hdr[2 * slot + 1], 0
            if mid != seq:
                code = ERR_BAD_MSG_ID
            elif n > sb:
                code, n = ERR_BAD_LEN, sb
            if code and not self._ctrl_dev.error:
                self._ctrl_dev.error_msg_id, self._ctrl_dev.error = seq, code
            out = b"" if code else bytes(process(req_data[slot * sb:slot * sb + n], seq))
            res_data[slot * sb:slot * sb + len(out)] = out
            res_hdr[2 * slot] = len(out) | ((DONE | (code << 8)) << 32)
            res_hdr[2 * slot + 1] = seq
            seq += 1
            counter[0] = seq
        self._ctrl_dev.state = KERNEL_EXITED
