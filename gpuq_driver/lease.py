"""The host half of the kernel's lease protocol: when to launch the persistent kernel again.

A persistent kernel that never returns blocks every call that synchronises its CUDA context
(``cuCtxSynchronize``, ``cuMemFree``, module loads, and so ``torch.cuda.synchronize()``, CuPy's
first kernels, cuBLAS set-up), for good.  So the queue's kernel runs on a *lease*: each launch
serves for at most ``QueueConfig.lease_ms`` and then leaves at a message boundary, and the host
launches the next lease (the device half and the handshakes are in ``device_src/gpuq_layout.cuh``,
"Leases"; the measurements behind the choice in ``docs/design.md``).

Two parties launch:

* While messages flow, a *producer*, after publishing, launches lease n + 1 once lease n - 1 is
  leaving (``leases_leaving``) and lease n, queued behind it, has not begun: the hand-over, which
  the round trip of that producer's message waits for anyway, so the launch (~3 µs once per
  lease) lands in that round trip, not in another one (``second``).  If no message came during
  the hand-over, it launches as soon as lease n has begun.  So one lease always waits queued
  behind the running one (two during a hand-over) and the GPU never waits for the host between
  leases.
* The *keeper*, a daemon thread, keeps the kernel serving for ``linger_ms`` after the last message:
  it looks every ``lease_ms / 2`` (0.2 .. 5 ms) and queues each successor itself, and while it
  does, a producer launches only when no lease will read the doorbell after its store: the newest
  lease has begun and is leaving (``leases_leaving == launches``) or has ended.  So the first
  message after a pause in traffic shorter than ``linger_ms`` costs a plain round trip, not a
  launch (a driver call after the thread slept costs 20-50 µs on the H200 hosts,
  ``benchmarks/probe_launch.py``).  Once the queue has been quiet for ``linger_ms`` the keeper
  stops launching, the last lease ends and the kernel *parks* (no GPU work at all); the next
  message launches a lease itself.  The keeper also launches whenever messages are pending and no
  lease runs or is queued (a lease does not always finish what it saw).  While messages flow it
  looks once a lease (at most every 5 ms), and every 20 ms while the kernel is parked; a look
  reads the doorbell's head and two device counters, with the GIL (a launch releases it).

A user's synchronising call made at time t waits for at most the running lease and the one queued
behind it: ``2 × lease_ms`` plus the messages the running lease has already seen, after which the
queue goes on where it left off.  The price of lingering is a kernel that polls (one PCIe read per
~µs, one block per SM) for ``linger_ms`` after the last message.

The keeper is also the queue's **watchdog** (``watch``).  A plugin that faults (a trap, an illegal
address) kills the lease with a sticky CUDA error, and one that never returns keeps it running for
ever; either way the device's lease counters stop moving, and nothing else would notice: no lease
ends, so nobody launches, and waiters would wait for good.  On every look while a lease runs the
keeper compares what the device already publishes (``leases_begun`` / ``leases_ended``, the warps'
processed counters: no extra device work) with its last look.  Once nothing has moved for
``min(2 × lease_ms, 50 ms, watchdog_ms)`` it asks the driver (``idle()``: ``cuStreamQuery``, no wait): an error
there is a fault (KernelFault, reported within that time plus two looks, <= 10 ms); a stream still busy while messages
have waited with nothing finished for ``watchdog_ms`` is a plugin that does not return
(PluginHung, naming the oldest message not processed: the one in the plugin).  Either stops the
queue for good (``failure``), warns once (RuntimeWarning), and every waiter raises it.  A launch
that fails is checked the same way (``idle()``), so a context lost while the kernel was parked is a
KernelFault too.

``Leases`` serves both backends (kernel.PersistentKernel and sim.SimulatedKernel): the backend
provides ``launch()`` (one more lease on its stream), ``idle()`` (nothing launched is still
running or queued; KernelFault if a lease faulted), and the device-written ``GpuqCtrlDev`` line
(``ctrl``, a ctypes struct over the shared memory).
"""

from __future__ import annotations

import copy
import math
import threading
import time
import warnings

from .errors import ConfigError, GpuqError, KernelFault, KernelStopped, QueueClosed, kernel_fault, plugin_hung
from .layout import KERNEL_EXITED, CtrlDev

_BEGUN = CtrlDev.leases_begun.offset // 8
_ENDED = CtrlDev.leases_ended.offset // 8
_LEAVING = CtrlDev.leases_leaving.offset // 8
FAULT_CHECK_MAX_S = 0.05  # the watchdog asks the driver once nothing moved for min(2 × lease, this)


class Leases:
    """Launch bookkeeping of one queue's kernel: ``launches`` (host-counted), ``pauses``, and the
    device's ``begun`` / ``leaving`` / ``ended`` lease counters, read in place (no CUDA call).

    lease_ms, linger_ms, watchdog_ms: as in QueueConfig; plugin (its name) and device (its ordinal,
    None on the simulator) for the watchdog's messages.  Thread-safe: any thread may call ``kick``;
    launches are serialised by one lock, and the backend makes its context current in the calling
    thread.  ``failure`` is the KernelFault or PluginHung that stopped the kernel for good (None
    while it has not); ``check()`` raises it (a copy) in the calling thread.
    """

    def __init__(
        self,
        kernel,
        lease_ms: float,
        linger_ms: float = 0.0,
        watchdog_ms: float = math.inf,
        plugin: str = "",
        device: int | None = None,
    ):
        self._kernel = kernel
        self._ahead = not math.isinf(lease_ms)  # a lease that never ends needs no successor queued
        self._period = min(max(lease_ms / 2e3, 2e-4), 5e-3)  # the keeper's look while lingering
        self._flow_period = min(lease_ms / 1e3, 5e-3)  # ... while messages flow
        self._linger = linger_ms / 1e3
        self._wake = threading.Event()
        self._keeper_parked = False  # the keeper waits 20 ms: a launch should wake it
        self._keeper_ended = False  # the keeper thread has left its loop: nobody to give way to
        self.fresh_until = 0.0  # time.monotonic() until which the keeper queues successors itself
        self.error: BaseException | None = None  # a launch by the keeper that failed
        words = kernel.layout.view(kernel.mem, "ctrl_dev", "Q")
        self.begun = words[_BEGUN : _BEGUN + 1]  # one-item views: [0] is the live value
        self.ended = words[_ENDED : _ENDED + 1]
        self.leaving = words[_LEAVING : _LEAVING + 1]
        self.launches = 0
        # after_publish queues a second lease during a hand-over (kick); False: the rule before
        # (probe_tail.py compares them)
        self.second = True
        # True while a thread is in a launch: the driver call lets go of the GIL, and a consumer
        # spinning on empty calls would keep it for CPython's switch interval (GpuQueue._give_way)
        self.launching = False
        # time.monotonic() from which the keeper wants the GIL, for the same give-way: the end of
        # its wait; in the past while its look runs (its driver calls let go of the GIL too); inf
        # once it has ended
        self.wake_at = math.inf
        self._unsure = False  # a launch was interrupted: ``launches`` may count one never queued
        self.pauses = 0  # times the kernel was asked to park (0 -> 1 pause in force)
        self._depth = 0  # pause() calls in force: nested and concurrent pauses count
        self.stopping = False  # shutdown asked for the last leases: no pause from now on
        self.closed = False  # no launch ever again (close, interpreter exit)
        self._lock = threading.Lock()
        # the watchdog (watch): what failed, and what it compares from look to look
        self.failure: KernelStopped | None = None  # KernelFault or PluginHung: stopped for good
        self._failing: KernelStopped | None = None  # the same, set first (fail: the queue is told in between)
        self.watchdog_ms = watchdog_ms
        self._watchdog_s = watchdog_ms / 1e3
        # the driver is asked once nothing moved for this long; never later than watchdog_ms, so
        # that a short watchdog beside a long lease still names a hang within watchdog_ms
        self._check_s = min(2 * lease_ms / 1e3, FAULT_CHECK_MAX_S, self._watchdog_s)
        self._plugin, self._device = plugin, device
        self._moved = None  # (leases ended, leases begun, messages processed or None) when last changed
        self._still_since = 0.0  # time.monotonic() of that look
        self._waiting_since = None  # since when messages have waited unprocessed (None: none wait)
        self._oldest_ref = self._on_failure_ref = None
        self._thread: threading.Thread | None = None

    def kick(self, ahead: bool = True, second: bool = False) -> bool:
        """Launch the next lease if the newest one has begun (ahead=True: queue a successor behind
        a running lease) or, with ahead=False, only if it has also reached its last doorbell read
        (nothing launched would see a message published before this call).  second=True (with
        ahead) also launches while the lease before the newest is leaving and the newest has not
        begun (a hand-over), so that two wait queued.  True if it launched.

        Does nothing while paused, after the kernel stopped for good (shut down, faulted or hung),
        or after ``close``.  Raises KernelFault if the launch fails because the CUDA context is lost
        (the queue is then stopped for good), CudaError if it fails otherwise.
        """
        if self._unsure:
            self._settle()
        with self._lock:
            if self.paused or self.closed or self._failing is not None or self._kernel.ctrl.state == KERNEL_EXITED:
                return False
            n = self.launches
            if not self._due(n, ahead, second):
                return False
            self.launches = n + 1  # first: the device's ended count never passes it
            self.launching = True  # the driver call lets go of the GIL: spinning consumers give way
            try:
                self._kernel.launch()
            except Exception as exc:  # the launch failed: nothing was queued
                self.launches = n
                failed = exc
            except BaseException:  # a KeyboardInterrupt in or just after the call: queued or not?
                self._unsure = True  # serving() settles it once the stream is idle
                raise
            else:
                failed = None
            finally:
                self.launching = False  # this thread has the GIL back
        if failed is not None:
            fault = self._fault_behind(failed)
            if fault is not None:
                raise copy.copy(fault) from failed
            raise failed
        if self._keeper_parked:
            self.wake_at = 0.0
            self._wake.set()
            if self._keeper_ended:  # it has ended (a failed launch): nobody wants the GIL back for it
                self.wake_at = math.inf
        return True

    def _due(self, n: int, ahead: bool, second: bool) -> bool:
        """kick's rule, with ``n`` leases launched (reads the device's counters, no lock)."""
        begun = self.begun[0]
        if begun != n:  # a launched lease has not begun yet: it will read the doorbell
            return second and self._ahead and begun == n - 1 and self.leaving[0] == n - 1
        if not ahead and self.leaving[0] != n:
            return False  # the running lease has not begun to leave: its last read is to come
        return self._ahead or self.ended[0] == n

    def after_publish(self) -> bool:
        """The producer's rule, after its doorbell store and a full fence: launch only if no lease
        will read the doorbell later, unless the keeper has fallen behind (then queue the successor
        now, as the keeper would have).  True if it launched.  Raises CudaError."""
        ahead = time.monotonic() > self.fresh_until
        second = ahead and self.second
        if not self._due(self.launches, ahead, second):  # the common case, without the lock
            return False
        return self.kick(ahead=ahead, second=second)

    def keep(self, enqueued_ref, processed_ref, oldest_ref=None, on_failure_ref=None) -> threading.Thread:
        """Start the keeper, a daemon thread.  ``enqueued_ref()`` and ``processed_ref()`` are weak
        references to callables returning messages enqueued so far (cheap: the doorbell's head) and
        messages the device has processed (a sum over the warps' counters, asked only while a lease
        runs or once the queue has been quiet for ``linger_ms``); ``oldest_ref()`` one returning the
        oldest msg_id not processed (or None), asked only when the watchdog reports a failure;
        ``on_failure_ref()`` one called once then (the queue refuses new messages).  Weak, so that
        the keeper does not keep its queue alive.

        While messages flow it looks once a lease (at most every 5 ms) and leaves queueing the
        successor to the producers (``after_publish``), as they publish anyway; for ``linger_ms``
        after the last message it looks every ``lease_ms / 2`` (0.2 .. 5 ms), queues each
        successor itself and tells the producers so (``fresh_until``), so that the next message
        needs no launch; after that, while nothing is pending, it launches nothing (the kernel
        parks) and looks every 20 ms.  On every look while a lease runs it is the watchdog
        (``watch``).  Ends at ``close``, when the queue is gone, or once the kernel failed."""
        self._oldest_ref, self._on_failure_ref = oldest_ref, on_failure_ref

        def run():
            try:
                look()
            finally:
                self._keeper_ended = True  # first: a kick that sets wake_at after this undoes it
                self.wake_at = math.inf  # nobody to give way to

        def look():
            seen, active = -1, 0.0
            self.wake_at = 0.0  # awake: the look's driver calls (cuStreamQuery, launches) want the GIL back
            while not self.closed and self.failure is None:
                enqueued, processed = enqueued_ref(), processed_ref()
                if enqueued is None or processed is None:
                    return
                n = enqueued()
                now = time.monotonic()
                flowing = n != seen
                if flowing:
                    seen, active = n, now
                lingering = not flowing and not self.paused and now - active < self._linger
                serving = self.serving()
                if serving:
                    self.watch(n, processed, now)
                if lingering:  # queue each successor itself, so that the next message needs no launch
                    launch = self.begun[0] == self.launches or not serving
                else:  # a rescue: messages wait and nothing runs or is queued
                    launch = not serving and not self.paused and processed() < n
                del enqueued, processed
                if launch and self.failure is None:
                    try:
                        serving = self.kick() or serving
                    except KernelStopped:  # a lost context: kick recorded it in failure
                        return
                    except Exception as exc:  # the launch failed otherwise: report it to the consumers, stop
                        self.error = exc
                        self.fresh_until = 0.0
                        return
                self.fresh_until = now + 2 * self._period if lingering else 0.0
                awake = flowing or serving
                self._keeper_parked = not (lingering or awake)
                wait = self._period if lingering else self._flow_period if awake else 20e-3
                self.wake_at = time.monotonic() + wait
                self._wake.wait(wait)
                self.wake_at = 0.0  # the look wants the GIL back however its wait ended (a kick wakes it early)
                self._wake.clear()

        self._thread = thread = threading.Thread(target=run, name="gpuq-lease-keeper", daemon=True)
        thread.start()
        return thread

    # -- the watchdog ----------------------------------------------------------------------------

    def watch(self, enqueued: int, processed, now: float) -> None:
        """One look of the watchdog (the keeper calls it on every look while a lease runs or is
        queued): ``enqueued`` messages so far, ``processed()`` the device's count, ``now`` =
        time.monotonic().  Reads only what the device publishes anyway (no extra device work).

        Once the leases launched have begun, ended and finished nothing for
        ``min(2 × lease_ms, 50 ms, watchdog_ms)``, it asks the driver whether the stream is still busy
        (``idle()``, no wait): a fault there is a KernelFault.  If it is busy, a lease has begun
        (one merely queued may wait for SMs that other kernels hold), and messages have waited,
        none finishing, for ``watchdog_ms``, the plugin does not return: PluginHung."""
        if self.failure is not None or self.closed:
            return
        ended = int(self.ended[0])
        if self.launches == ended:  # nothing launched runs or waits: nothing to stall
            self._moved, self._waiting_since = None, None
            return
        begun = int(self.begun[0])
        if self._moved is None or self._moved[:2] != (ended, begun):  # a lease began or ended: it moves
            self._moved, self._still_since, self._waiting_since = (ended, begun, None), now, None
            return  # (the processed count, a sum over the warps, is read only while no lease begins or ends)
        done = processed()
        if self._moved[2] != done:
            if self._moved[2] is not None:  # a message finished since the last look
                self._still_since = now
            self._moved = (ended, begun, done)
        if begun <= ended or enqueued <= done:  # no lease runs, or no message waits
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = now
        if now - self._still_since < self._check_s:
            return
        try:
            busy = not self._kernel.idle()
        except KernelFault as exc:
            self._fault_behind(exc)
            return
        if busy and self._waiting_since is not None:
            stuck = now - max(self._still_since, self._waiting_since)
            if stuck >= self._watchdog_s:
                self.fail(plugin_hung(self._plugin, self._device, stuck, self.watchdog_ms, msg_id=self._oldest()))

    def _oldest(self):
        """The oldest msg_id not processed, from the queue (None if unknown)."""
        oldest = self._oldest_ref() if self._oldest_ref is not None else None
        try:
            return oldest() if oldest is not None else None
        except Exception:  # the queue is being closed: its memory is gone
            return None

    def _fault_behind(self, exc: BaseException) -> KernelStopped | None:
        """After ``exc`` (a failed launch, or the backend's KernelFault): if the stream reports a
        fault (the CUDA context is lost), record it as the failure, naming the oldest message not
        processed, and return it; None if the stream is fine (``exc`` was something else)."""
        fault = exc if isinstance(exc, KernelFault) else None
        if fault is None:
            try:
                self._kernel.idle()
            except KernelFault as probed:
                fault = probed
            except Exception:
                return None
            else:
                return None
        found = kernel_fault(fault.cause, fault.plugin, fault.device, msg_id=self._oldest())
        found.__cause__ = fault.__cause__  # on the simulator: the twin's exception
        return self.fail(found)

    def fail(self, failure: KernelStopped) -> KernelStopped:
        """Stop for good with ``failure`` (the first one wins; returned): no launch from now on,
        the queue is told first (``on_failure_ref``: it accepts no message from then on), then
        waiters see it and raise it, and a RuntimeWarning says why (once)."""
        with self._lock:
            first = self._failing is None
            if first:
                self._failing = failure
            failure = self._failing
        if first:
            told = self._on_failure_ref() if self._on_failure_ref is not None else None
            if told is not None:
                told()
            self.failure = failure
            self.fresh_until = 0.0
            self._wake.set()
            warnings.warn(f"gpuq_driver: {failure}", RuntimeWarning, stacklevel=3)
        return failure

    def check(self) -> None:
        """Raise the failure (a copy: one per raising thread) if the kernel faulted or hung."""
        failure = self.failure
        if failure is not None:
            raise copy.copy(failure)

    @property
    def paused(self) -> bool:
        """True while at least one ``pause()`` is in force."""
        return self._depth > 0

    def serving(self) -> bool:
        """True while a launched lease is running or queued (the device has not ended them all)."""
        if self._unsure:
            self._settle()
        return self.ended[0] != self.launches

    def _settle(self) -> None:
        """After a launch interrupted with its outcome unknown (counted as launched): once the
        stream is idle, nothing launched runs or waits, so the device's ended count is the number
        of leases launched.  (Counted but never queued, the lease would have been waited for as
        "not begun yet" for good: no producer, no keeper would launch again.)"""
        with self._lock:
            if not self._unsure:
                return
            try:
                if not self._kernel.idle():
                    return
            except KernelFault:
                return  # the watchdog and the waiters find it
            self.launches = int(self.ended[0])
            self._unsure = False

    def pause(self, timeout: float, noted: list | None = None) -> None:
        """Stop launching, then wait (up to ``timeout`` s) until no lease runs or is queued.

        Pauses nest: the kernel runs again after as many ``resume()`` calls.  Returns within
        ``2 × lease_ms`` plus the messages in flight.  Raises GpuqError on timeout (this pause
        is undone), QueueClosed once shutdown or close has begun, ConfigError where leases
        never end (``lease_ms=math.inf``), KernelFault / PluginHung once the kernel has failed
        (also when that is found while it waits; the pause is undone).  Anything else raised while
        it waits (a KeyboardInterrupt) undoes the pause too.  ``noted``: a list that gets True
        appended once the pause is in force and waited for, so that a caller interrupted as this
        returns knows to undo it (GpuQueue.paused).
        """
        self.check()
        if not self._ahead:
            raise ConfigError("lease_ms=inf: the kernel never leaves, so pause() cannot park it")
        counted = False
        try:
            with self._lock:
                if self.stopping or self.closed:
                    raise QueueClosed("queue is shut down: there is nothing to pause")
                self._depth += 1
                counted = True  # a store, no call: no KeyboardInterrupt between the two
                if self._depth == 1:
                    self.pauses += 1
            self._wait_parked(timeout)
        except BaseException:
            if counted:
                self.resume()
            raise
        if noted is not None:
            noted.append(True)  # C code: done before a KeyboardInterrupt can be raised after it

    def _wait_parked(self, timeout: float) -> None:
        """pause()'s wait (the caller undoes the pause if this raises)."""
        deadline = time.monotonic() + timeout
        while self._busy():
            if self.failure is not None:
                self.check()
            if self.closed:
                raise QueueClosed("queue was closed while pause() waited")
            if self.stopping:
                raise QueueClosed("queue was shut down while pause() waited")
            if time.monotonic() > deadline:
                raise GpuqError(
                    f"the persistent kernel did not leave within {timeout} s "
                    f"({self.launches} leases launched, {self.ended[0]} ended); not paused"
                )
            time.sleep(50e-6)

    def _busy(self) -> bool:
        """A lease runs or is queued (pause's wait); a fault the stream reports is recorded."""
        try:
            return self.serving() or not self._kernel.idle()
        except KernelFault as exc:
            self._fault_behind(exc)
            return True

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
        """No launch from now on (the caller then stops the kernel and waits for it); waits up to
        1 s for the keeper's last look, so that it reads no memory about to be freed."""
        with self._lock:
            self.closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
