"""The host half of the kernel's lease protocol: when to launch the persistent kernel again.

A persistent kernel that never returns blocks every call that synchronises its CUDA context
(``cuCtxSynchronize``, ``cuMemFree``, module loads, and so ``torch.cuda.synchronize()``, CuPy's
first kernels, cuBLAS set-up), for good.  So the queue's kernel runs on a *lease*: each launch
serves for at most ``QueueConfig.lease_ms`` and then leaves at a message boundary, and the host
launches the next lease on demand (the device half and the handshake are in
``device_src/gpuq_layout.cuh``, "Leases"; the measurements behind the choice in ``docs/design.md``).

The rule, applied by every producer after it publishes a message: *if the newest launched lease
has begun serving (``leases_begun == launches``), launch the next one* on the queue's stream.
Under traffic that keeps exactly one lease queued behind the running one, so the GPU never waits
for the host between leases; when the queue is idle nothing is launched at all, and the first
message afterwards launches a lease itself.  A lease that sees a message does not always finish
it (its time may run out under a backlog), so a *keeper* thread watches too: when messages are
pending and no lease is running or queued, it launches one.  It looks once a lease (at most every
5 ms) while a lease runs, every 20 ms while the kernel is parked, and at once when a producer
launches a lease into a parked queue; a look costs ~1 µs of the GIL.
A user's synchronising call made at time t waits for at most the running lease and the one
queued behind it: ``2 × lease_ms`` plus the messages in flight (one per warp), after which the
queue goes on where it left off.

``Leases`` serves both backends (kernel.PersistentKernel and sim.SimulatedKernel): the backend
provides ``launch()`` (one more lease on its stream), ``idle()`` (nothing launched is still
running or queued), and the device-written ``GpuqCtrlDev`` line (``ctrl``, a ctypes struct over
the shared memory).
"""

from __future__ import annotations

import math
import threading
import time

from .errors import ConfigError, GpuqError, QueueClosed
from .layout import KERNEL_EXITED, CtrlDev

_BEGUN = CtrlDev.leases_begun.offset // 8
_ENDED = CtrlDev.leases_ended.offset // 8


class Leases:
    """Launch bookkeeping of one queue's kernel: ``launches`` (host-counted), ``pauses``, and the
    device's ``begun`` / ``ended`` lease counters, read in place (no CUDA call).

    Thread-safe: any thread may call ``kick``; launches are serialised by one lock, and the
    backend makes its context current in the calling thread.
    """

    def __init__(self, kernel, lease_ms: float):
        self._kernel = kernel
        self._ahead = not math.isinf(lease_ms)  # a lease that never ends needs no successor queued
        self._period = min(lease_ms / 1e3, 5e-3)  # the keeper's look, while a lease runs
        self._wake = threading.Event()
        self._keeper_parked = False  # the keeper waits 20 ms: a launch should wake it
        self.error: BaseException | None = None  # a launch by the keeper that failed
        words = kernel.layout.view(kernel.mem, "ctrl_dev", "Q")
        self.begun = words[_BEGUN:_BEGUN + 1]   # one-item views: [0] is the live value
        self.ended = words[_ENDED:_ENDED + 1]
        self.launches = 0
        self.pauses = 0          # times the kernel was asked to park (0 -> 1 pause in force)
        self._depth = 0          # pause() calls in force: nested and concurrent pauses count
        self.stopping = False    # shutdown asked for the last leases: no pause from now on
        self.closed = False      # no launch ever again (close, interpreter exit)
        self._lock = threading.Lock()

    def kick(self) -> bool:
        """Launch the next lease if the newest one has begun (or none is queued); True if it did.

        Does nothing while paused, after the kernel stopped for good, or after ``close``.
        Raises CudaError if the launch fails (a lost context, say).
        """
        with self._lock:
            if self.paused or self.closed or self._kernel.ctrl.state == KERNEL_EXITED:
                return False
            if self.begun[0] != self.launches:
                return False  # a launched lease has not begun yet: it will read the doorbell
            if not self._ahead and self.ended[0] != self.launches:
                return False
            self.launches += 1  # first: the device's ended count never passes it
            try:
                self._kernel.launch()
            except BaseException:
                self.launches -= 1
                raise
        if self._keeper_parked:
            self._wake.set()
        return True

    def keep(self, pending_ref) -> threading.Thread:
        """Start the keeper: a daemon thread that, while ``pending_ref()()`` (messages enqueued and
        not yet processed; a weak reference, so that the keeper does not keep its queue alive) and
        no lease runs or is queued, launches one.  Ends at ``close`` or when the queue is gone."""
        def run():
            while not self.closed:
                serving = self.serving()
                pending = pending_ref()
                if pending is None:
                    return
                if not serving and not self.paused and pending():
                    try:
                        serving = self.kick()
                    except Exception as exc:  # a lost context: report it to the consumers, stop
                        self.error = exc
                        return
                del pending
                self._keeper_parked = not serving
                self._wake.wait(self._period if serving else 20e-3)
                self._wake.clear()

        thread = threading.Thread(target=run, name="gpuq-lease-keeper", daemon=True)
        thread.start()
        return thread

    @property
    def paused(self) -> bool:
        """True while at least one ``pause()`` is in force."""
        return self._depth > 0

    def serving(self) -> bool:
        """True while a launched lease is running or queued (the device has not ended them all)."""
        return self.ended[0] != self.launches

    def pause(self, timeout: float) -> None:
        """Stop launching, then wait (up to ``timeout`` s) until no lease runs or is queued.

        Pauses nest: the kernel runs again after as many ``resume()`` calls.  Returns within
        ``2 × lease_ms`` plus the messages in flight.  Raises GpuqError on timeout (this pause
        is undone), QueueClosed once shutdown or close has begun, ConfigError where leases
        never end (``lease_ms=math.inf``).
        """
        if not self._ahead:
            raise ConfigError("lease_ms=inf: the kernel never leaves, so pause() cannot park it")
        with self._lock:
            if self.stopping or self.closed:
                raise QueueClosed("queue is shut down: there is nothing to pause")
            self._depth += 1
            if self._depth == 1:
                self.pauses += 1
        deadline = time.monotonic() + timeout
        while self.serving() or not self._kernel.idle():
            if self.closed:
                raise QueueClosed("queue was closed while pause() waited")
            if self.stopping:
                raise QueueClosed("queue was shut down while pause() waited")
            if time.monotonic() > deadline:
                self.resume()
                raise GpuqError(f"the persistent kernel did not leave within {timeout} s "
                                f"({self.launches} leases launched, {self.ended[0]} ended); not paused")
            time.sleep(50e-6)

    def resume(self) -> None:
        """Undo one ``pause()``; when none is left in force, launch again: messages enqueued while
        paused are served from here on.  Without a pause in force it does nothing."""
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth:
                return
        self.kick()

    def stop(self) -> None:
        """Shutdown has begun: every pause is lifted (a drain needs leases, an abort one lease to
        see the stop) and no new one is accepted."""
        with self._lock:
            self.stopping = True
            self._depth = 0

    def close(self) -> None:
        """No launch from now on (the caller then stops the kernel and waits for it)."""
        with self._lock:
            self.closed = True
        self._wake.set()
