"""Faults (docs/api.md, "Faults"): a plugin that faults (KernelFault) or never returns (PluginHung).

The watchdog's rules on a fake kernel, step by step (no threads, no clock); the whole queue on the
simulator (a twin that raises, one that never returns), in this process; then the same scenarios in
child processes with a time bound (tests/fault_child.py), where the process must also exit, and
status 0: on the simulator here, on the GPU (trap, illegal address, endless loop; each in its own
process, as a fault loses the CUDA context for the whole process) where one exists.
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import pytest

from gpuq_driver import (
    BatchProcessor,
    ConfigError,
    CudaError,
    GpuqError,
    GpuQueue,
    KernelFault,
    KernelStopped,
    PluginHung,
    QueueConfig,
)
from gpuq_driver.errors import kernel_fault, plugin_hung
from gpuq_driver.layout import CtrlDev, HostLayout
from gpuq_driver.lease import Leases
from gpuq_driver.plugins import Plugin

ECHO_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  for (uint32_t i = lane; i < len; i += 32u) out[i] = in[i];
  return len;
}
"""
LAUNCH_FAILED = CudaError(719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure", "cuStreamQuery")


# -- the error classes ----------------------------------------------------------------------------


def test_the_error_classes_and_their_messages():
    assert issubclass(KernelFault, KernelStopped) and issubclass(PluginHung, KernelStopped)
    assert issubclass(KernelStopped, GpuqError)
    gpu = kernel_fault(str(LAUNCH_FAILED), "bad", 0, msg_id=3)
    text = str(gpu)
    for part in (
        "the CUDA context of device 0 is lost",
        "CUDA_ERROR_LAUNCH_FAILED (719) in cuStreamQuery: unspecified launch failure",
        "plugin 'bad' trapped",
        "Every CUDA call on device 0 in this process fails from now on, PyTorch and CuPy included",
        "results already taken stay valid",
        "msg_id 3 and every later message will never be processed",
        "Restart the process",
        "compute-sanitizer",
    ):
        assert part in text, part
    assert (gpu.cause, gpu.plugin, gpu.device, gpu.msg_id, gpu.batch) == (str(LAUNCH_FAILED), "bad", 0, 3, None)
    sim = kernel_fault("ZeroDivisionError('boom') at msg_id 3", "bad", msg_id=3)
    assert "the simulated kernel faulted: the twin of plugin 'bad' raised ZeroDivisionError" in str(sim)
    assert "Results already taken stay valid; msg_id 3 and every later message will never be processed" in str(sim)
    hung = plugin_hung("spin", 0, 5.2, 5000.0, msg_id=9)
    for part in (
        "plugin 'spin' did not return: msg_id 9 (the oldest message not processed) has been in the kernel for 5.2 s",
        "(watchdog_ms=5000)",
        "it keeps device 0 busy until this process exits",
        "torch.cuda.synchronize()",
        "Restart the process; fix the plugin",
        "raise watchdog_ms",
    ):
        assert part in str(hung), part
    batch = plugin_hung("spin", 0, 1.0, 1000.0, batch=4, messages=8)
    assert "batch 4 has been in the kernel" in str(batch) and "batch 4 (8 messages) has no results" in str(batch)
    for exc in (gpu, sim, hung, batch):  # waiters raise copies; errors cross processes
        for again in (copy.copy(exc), pickle.loads(pickle.dumps(exc))):
            assert type(again) is type(exc) and str(again) == str(exc) and again.__dict__ == exc.__dict__
    sim.__cause__ = ZeroDivisionError("boom")  # the twin's exception: each waiter's copy keeps it
    assert copy.copy(sim).__cause__ is sim.__cause__
    assert copy.copy(KernelStopped("stopped")).__cause__ is None


def test_a_hang_message_gives_short_times_in_milliseconds():
    """watchdog_ms may be 1: "for 0.0 s" would say nothing."""
    assert "has been in the twin for 52 ms with no message finished meanwhile (watchdog_ms=50)" in str(
        plugin_hung("spin", None, 0.052, 50.0, msg_id=1)
    )
    assert "for 3600.2 s" in str(plugin_hung("spin", 0, 3600.2, 3_600_000.0, msg_id=1))
    assert "(watchdog_ms=3600000)" in str(plugin_hung("spin", 0, 3600.2, 3_600_000.0, msg_id=1))


def test_watchdog_ms_is_checked():
    assert QueueConfig().watchdog_ms == 5000.0 and QueueConfig(watchdog_ms=math.inf).watchdog_ms == math.inf
    assert QueueConfig().watchdog_ms / 1e3 < QueueConfig().shutdown_timeout_s  # a hang in shutdown is named
    for bad in (0, 0.5, -1, "1", None, True, math.nan, 3_600_001):
        with pytest.raises(ConfigError, match="watchdog_ms"):
            QueueConfig(watchdog_ms=bad)
        with pytest.raises(ConfigError, match="watchdog_ms"):
            BatchProcessor(backend="numpy", watchdog_ms=bad)


# -- the watchdog's rules (lease.Leases.watch), by hand ---------------------------------------------


class FakeKernel:
    """The device-written line, and a stream that is busy, idle or faulted as the test says."""

    def __init__(self):
        self.layout = HostLayout(2, 16, 1)
        self.mem = memoryview(bytearray(self.layout.nbytes))
        self.ctrl = CtrlDev.from_buffer(self.mem, self.layout.offsets["ctrl_dev"])
        self.busy, self.fault, self.launched, self.queries = True, None, 0, 0

    def launch(self):
        if self.fault is not None:
            raise LAUNCH_FAILED
        self.launched += 1

    def idle(self):
        self.queries += 1
        if self.fault is not None:
            raise self.fault
        return not self.busy


def watched(lease_ms=1.0, watchdog_ms=1000.0):
    k = FakeKernel()
    leases = Leases(k, lease_ms, 0.0, watchdog_ms, "spin", 0)
    leases._oldest_ref = lambda: lambda: 7  # the queue's oldest message not processed
    told = []
    leases._on_failure_ref = lambda: lambda: told.append(True)
    assert leases.kick() and k.launched == 1
    k.ctrl.leases_begun = 1  # lease 1 has begun, and runs
    return k, leases, told


def test_the_watchdog_names_a_plugin_that_stopped_finishing_messages():
    k, leases, told = watched()
    done = [5]
    processed = lambda: done[0]
    leases.watch(8, processed, 100.0)  # 3 messages wait
    leases.watch(8, processed, 100.001)
    assert k.queries == 0  # still for less than 2 × lease_ms: no driver call
    leases.watch(8, processed, 100.5)
    assert k.queries == 1 and leases.failure is None  # busy, but not for watchdog_ms yet
    done[0] = 6  # a message finished: progress
    leases.watch(8, processed, 100.9)
    leases.watch(8, processed, 101.85)
    assert leases.failure is None  # 0.95 s since the last progress
    with pytest.warns(RuntimeWarning, match="plugin 'spin' did not return: msg_id 7"):
        leases.watch(8, processed, 101.95)
    failure = leases.failure
    assert isinstance(failure, PluginHung) and failure.msg_id == 7 and failure.seconds == pytest.approx(1.05)
    assert told == [True] and failure.device == 0 and failure.watchdog_ms == 1000.0
    with pytest.raises(PluginHung) as info:
        leases.check()
    assert info.value is not failure and str(info.value) == str(failure)
    assert not leases.kick() and k.launched == 1  # stopped for good
    leases.watch(8, processed, 200.0)  # nothing more happens
    assert leases.failure is failure and told == [True]


def test_a_watchdog_shorter_than_two_leases_is_kept():
    """watchdog_ms=5 beside lease_ms=20: the hang is named after 5 ms, not after 2 × lease_ms."""
    k, leases, _ = watched(lease_ms=20.0, watchdog_ms=5.0)
    leases.watch(8, lambda: 5, 100.0)
    leases.watch(8, lambda: 5, 100.004)  # 3 messages wait from here on
    assert leases.failure is None and k.queries == 0
    with pytest.warns(RuntimeWarning, match=r"did not return: msg_id 7 .* for 6 ms"):
        leases.watch(8, lambda: 5, 100.010)
    assert k.queries == 1 and isinstance(leases.failure, PluginHung)


@pytest.mark.parametrize("why", ["nothing waits", "no lease has begun", "the lease ends", "watchdog off"])
def test_the_watchdog_does_not_fire_on_a_healthy_kernel(why):
    k, leases, _ = watched(watchdog_ms=math.inf if why == "watchdog off" else 1000.0)
    done, enqueued = [5], 8
    if why == "nothing waits":
        done[0] = enqueued  # an idle kernel that never leaves (lease_ms=inf) is not hung
    if why == "no lease has begun":
        k.ctrl.leases_begun = 0  # launched, queued behind other work on the GPU (a cooperative launch waits for SMs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(100):
            if why == "the lease ends" and step % 10 == 9:  # a lease ends, the next begins
                k.ctrl.leases_ended += 1
                leases.launches += 1
                k.ctrl.leases_begun += 1
            leases.watch(enqueued, lambda: done[0], 100.0 + step * 0.1)
    assert leases.failure is None


@pytest.mark.parametrize("lease_ms, seen_after", [(1.0, 0.002), (math.inf, 0.05)])
def test_the_watchdog_reports_a_fault_within_min_2_leases_50_ms(lease_ms, seen_after):
    k, leases, told = watched(lease_ms=lease_ms)
    k.fault = kernel_fault(str(LAUNCH_FAILED), "spin", 0)  # what the backend's idle() raises
    leases.watch(8, lambda: 5, 100.0)
    leases.watch(8, lambda: 5, 100.0 + seen_after * 0.9)
    assert leases.failure is None and k.queries == 0
    with pytest.warns(RuntimeWarning, match="CUDA context of device 0 is lost"):
        leases.watch(8, lambda: 5, 100.0 + seen_after * 1.01)
    assert isinstance(leases.failure, KernelFault) and leases.failure.msg_id == 7 and told == [True]
    with pytest.raises(KernelFault, match="msg_id 7 and every later message"):
        leases.pause(1.0)
    assert not leases.paused  # the pause it refused is not left in force


def test_a_lease_that_never_began_in_a_lost_context_is_a_fault():
    """Other CUDA work in the process faulted while our lease was still queued: found all the same."""
    k, leases, _ = watched()
    k.ctrl.leases_begun = 0  # launched, not begun
    k.fault = kernel_fault(str(LAUNCH_FAILED), "spin", 0)
    leases.watch(0, lambda: 0, 100.0)  # nothing enqueued even
    with pytest.warns(RuntimeWarning, match="CUDA context of device 0 is lost"):
        leases.watch(0, lambda: 0, 100.01)
    assert isinstance(leases.failure, KernelFault)


def test_a_launch_that_fails_in_a_lost_context_is_a_fault():
    k, leases, _ = watched()
    k.ctrl.leases_begun = k.ctrl.leases_ended = k.ctrl.leases_leaving = 1  # parked: the next message launches
    k.fault = kernel_fault(str(LAUNCH_FAILED), "spin", 0)
    with pytest.warns(RuntimeWarning), pytest.raises(KernelFault, match="CUDA_ERROR_LAUNCH_FAILED") as info:
        leases.kick()
    assert isinstance(info.value.__cause__, CudaError) and isinstance(leases.failure, KernelFault)
    k2, leases2, _ = watched()
    k2.ctrl.leases_ended = k2.ctrl.leases_leaving = 1
    k2.launch = lambda: (_ for _ in ()).throw(CudaError(1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"))
    with pytest.raises(CudaError, match="INVALID_VALUE"):  # the stream is fine: an ordinary error
        leases2.kick()
    assert leases2.failure is None and leases2.launches == 1


# -- the whole queue on the simulator -----------------------------------------------------------------


def fragile(payload, msg_id):
    if msg_id >= 3:
        raise ZeroDivisionError("boom")
    return bytes(payload)


def sim_queue(twin, **fields) -> GpuQueue:
    plugin = Plugin.from_source("bad", ECHO_SOURCE, twin=twin)
    return GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend="sim", plugin=plugin, **fields))


def every_waiter(q, msg_id) -> dict:
    """What each call that waits for the kernel raises (a class name, or "returned")."""
    calls = {
        "enqueue": lambda: q.enqueue(b"x", timeout=5),
        "enqueue_many": lambda: q.enqueue_many([b"x", b"y"], timeout=5),  # the fault, not QueueClosed
        "reserve": lambda: q.reserve(1, timeout=5),
        "wait_result": lambda: q.wait_result(msg_id, timeout=None),
        "poll_completions": q.poll_completions,
        "pause": lambda: q.pause(timeout=5),
        "shutdown": lambda: q.shutdown(timeout=5),
    }
    out = {}
    for name, call in calls.items():
        start = time.monotonic()
        try:
            call()
            out[name] = "returned"
        except Exception as exc:
            out[name] = type(exc).__name__
        assert time.monotonic() - start < 1.0, name
    return out


def test_a_twin_that_raises_is_a_fault_for_every_waiter():
    q = sim_queue(fragile)
    ids = [q.enqueue(bytes([i])) for i in range(3)]
    assert [q.wait_result(i, timeout=5) for i in ids[:2]] == [b"\0", b"\1"]
    deadline = time.monotonic() + 5
    while q.stats().processed < 3:  # msg_id 2 done, not taken
        assert time.monotonic() < deadline
        time.sleep(1e-3)
    bad = q.enqueue(b"bad")
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="twin of plugin 'bad' raised"):
        with pytest.raises(KernelFault) as info:
            q.wait_result(bad, timeout=None)
    assert time.monotonic() - start < 0.5  # min(2 × lease_ms, 50 ms) + a look, and some slack
    err = info.value
    assert err.msg_id == bad == 3 and err.device is None and "ZeroDivisionError('boom') at msg_id 3" in err.cause
    cause = err.__cause__  # the twin's own exception, its traceback in the twin: as BatchProcessor's NumPy path
    assert isinstance(cause, ZeroDivisionError) and cause.__traceback__ is not None
    assert "in fragile" in "".join(traceback.format_exception(err))
    with pytest.raises(KernelFault) as again:
        q.wait_result(bad, timeout=None)  # every later waiter too
    assert again.value.__cause__ is cause
    assert q.try_dequeue_result(2) == b"\2"  # a result done before the fault stays readable
    assert set(every_waiter(q, bad).values()) == {"KernelFault"}
    s = q.stats()
    assert s.kernel == "faulted" and "msg_id 3 and every later message" in s.fault
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second report, no exception: it was reported already
        start = time.monotonic()
        q.close()
        assert time.monotonic() - start < 0.5 and q.closed
    assert isinstance(q._kernel.fault, ZeroDivisionError)


@pytest.mark.parametrize("lease_ms", [1.0, math.inf])
def test_a_twin_that_never_returns_is_named_by_the_watchdog(lease_ms):
    never = threading.Event()

    def spin(payload, msg_id):
        if msg_id == 2:
            never.wait()
        return bytes(payload)

    q = sim_queue(spin, watchdog_ms=300, lease_ms=lease_ms)
    try:
        assert q.wait_result(q.enqueue(b"a"), timeout=5) == b"a"
        assert q.wait_result(q.enqueue(b"b"), timeout=5) == b"b"
        stuck = q.enqueue(b"c")
        for _ in range(7):
            q.enqueue(b"fill")  # the ring is full: the slot of the next frees when msg_id 2 is taken
        blocked = {}

        def wait_in(name, call):
            try:
                call()
                blocked[name] = "returned"
            except Exception as exc:
                blocked[name] = type(exc).__name__

        threads = [
            threading.Thread(target=wait_in, args=("enqueue", lambda: q.enqueue(b"full", timeout=math.inf))),
        ]
        if lease_ms != math.inf:
            threads.append(threading.Thread(target=wait_in, args=("pause", lambda: q.pause(timeout=30))))
        start = time.monotonic()
        for t in threads:
            t.start()
        with pytest.warns(RuntimeWarning, match="msg_id 2 .* has been in the twin"):
            with pytest.raises(PluginHung) as info:
                q.wait_result(stuck, timeout=None)
        waited = time.monotonic() - start
        assert 0.29 <= waited < 0.3 + 0.5, waited  # watchdog_ms (+ lease_ms) + a look, and some slack
        assert info.value.msg_id == stuck and info.value.watchdog_ms == 300
        for t in threads:
            t.join(1.0)  # the calls already waiting end too
        expected = ["enqueue", "pause"] if lease_ms != math.inf else ["enqueue"]  # pause needs leases
        assert blocked == dict.fromkeys(expected, "PluginHung")
        assert set(every_waiter(q, stuck).values()) == {"PluginHung"}
        assert q.stats().kernel == "hung" and "watchdog_ms=300" in q.stats().fault
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="still running"):
            q.close()  # does not wait for the thread stuck in the twin
        assert time.monotonic() - start < 0.2 and q.closed
    finally:
        never.set()


def test_shutdown_names_a_hang_it_meets():
    never = threading.Event()
    q = sim_queue(lambda p, m: never.wait() or bytes(p), watchdog_ms=200)
    try:
        q.enqueue(b"a")
        start = time.monotonic()
        with pytest.warns(RuntimeWarning), pytest.raises(PluginHung, match="msg_id 0"):
            q.shutdown(timeout=10)  # not the generic "did not drain within 10 s"
        assert time.monotonic() - start < 1.0
        with pytest.warns(RuntimeWarning, match="still running"):
            q.close()
    finally:
        never.set()


def test_a_slow_plugin_a_paused_queue_and_an_idle_one_are_not_hung():
    q = sim_queue(lambda p, m: time.sleep(0.1) or bytes(p), watchdog_ms=250)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the watchdog
        ids = [q.enqueue(bytes([i])) for i in range(6)]  # 0.6 s of work, 0.1 s per message
        assert [q.wait_result(i, timeout=5) for i in ids] == [bytes([i]) for i in range(6)]
        with q.paused():
            waiting = q.enqueue(b"w")
            time.sleep(0.4)  # messages wait, but no lease runs
            assert q.stats().kernel == "paused"
        assert q.wait_result(waiting, timeout=5) == b"w"
        time.sleep(0.4)  # idle, parked or lingering
        assert q.stats().fault == "" and q.wait_result(q.enqueue(b"z"), timeout=5) == b"z"
        q.close()


# -- BatchProcessor ---------------------------------------------------------------------------------


def test_batch_processor_numpy_a_twin_that_raises_is_a_fault():
    plugin = Plugin.from_source("bad", ECHO_SOURCE, twin=fragile)
    with BatchProcessor(slot_bytes=16, max_batch=8, plugin=plugin, backend="numpy") as proc:
        assert proc.process([b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
        with pytest.raises(KernelFault, match="batch 1 of a BatchProcessor faulted") as info:
            proc.process([b"x"] * 5)
        assert info.value.batch == 1 and "batch 1 (5 messages) has no results" in str(info.value)
        with pytest.raises(KernelFault):  # stopped for good, as on the GPU
            proc.process([b"a"])
    assert proc.closed


class _Stream:
    def __init__(self, done):
        self._done = done

    def done(self):
        if isinstance(self._done, Exception):
            raise self._done
        return self._done


class _Context:
    def make_current(self):
        pass


def test_batch_processor_bounds_its_wait_for_the_gpu():
    """The CUDA path's wait and its fault rule, with a stand-in stream (no GPU needed)."""
    proc = BatchProcessor(slot_bytes=16, max_batch=8, backend="numpy", watchdog_ms=50)
    proc.backend, proc._hung = "cuda", [False]  # as _init_cuda leaves them
    proc._stream = _Stream(False)  # a kernel that never ends
    start = time.monotonic()
    with pytest.raises(PluginHung, match=r"batch 0 has been in the kernel for \d+ ms .*watchdog_ms=50\)") as info:
        proc._wait(8)
    assert 0.05 <= time.monotonic() - start < 0.5 and info.value.batch == 0 and proc._hung == [True]
    with pytest.raises(PluginHung):
        proc.process([b"a"])  # every later batch
    with pytest.warns(RuntimeWarning, match="not freed"):
        proc.close()
    proc = BatchProcessor(slot_bytes=16, max_batch=8, backend="numpy")
    proc.backend, proc._stream, proc._ctx = "cuda", _Stream(True), _Context()
    assert proc._fault(CudaError(1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"), 4) is None  # stream fine
    proc._stream = _Stream(LAUNCH_FAILED)
    fault = proc._fault(LAUNCH_FAILED, 4)
    assert isinstance(fault, KernelFault) and fault.device == 0 and fault.batch == 0
    assert "the CUDA context of device 0 is lost: batch 0 of a BatchProcessor failed" in str(fault)
    with pytest.raises(KernelFault):
        proc.process([b"a"])
    proc.backend = "numpy"
    proc.close()


# -- child processes: the process must also exit, with status 0, in time ------------------------------

CHILD = Path(__file__).with_name("fault_child.py")


def run_child(scenario: str, backend: str, kind: str, bound_s: float) -> tuple[dict, str, float]:
    """Runs fault_child.py; returns ({first word: [rest of each such line]}, the output, seconds the
    exit took after CHILD-DONE).  Fails on a hang (past bound_s) or an exit status other than 0."""
    try:
        r = subprocess.run(
            [sys.executable, str(CHILD), scenario, backend, kind], capture_output=True, text=True, timeout=bound_s
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{scenario} {backend} {kind}: no exit within {bound_s} s; output: {exc.stdout!r} {exc.stderr!r}")
    ended = time.time()
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{scenario} {backend} {kind}: exit status {r.returncode}\n{out[-3000:]}"
    lines: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        word, _, rest = line.partition(" ")
        lines.setdefault(word, []).append(rest)
    assert "CHILD-DONE" in lines, out[-3000:]
    return lines, out, ended - float(lines["CHILD-DONE"][0])


def check_error(lines: dict, out: str, cls: str, kind: str, within: tuple[float, float]) -> str:
    name, seconds, *ids = lines["ERROR"][0].split()
    assert name == cls, out[-3000:]
    assert within[0] <= float(seconds) <= within[1], f"{cls} after {seconds} s, not within {within}"
    message = lines["MESSAGE"][0]
    assert f"plugin 'bad_{kind}'" in message
    return " ".join(ids)


def check_queue(lines: dict, out: str, backend: str, kind: str) -> None:
    hang = kind == "hang"
    cls = "PluginHung" if hang else "KernelFault"
    ids = check_error(lines, out, cls, kind, (0.9, 3.0) if hang else (0.0, 1.0))
    assert ids == "msg_id=3 batch=None"
    message = lines["MESSAGE"][0]
    if backend == "cuda":
        if hang:
            assert "msg_id 3 (the oldest message not processed) has been in the kernel" in message
        else:
            assert "the CUDA context of device 0 is lost: the queue's kernel failed with CUDA_ERROR_" in message
            if kind == "illegal":
                assert "CUDA_ERROR_ILLEGAL_ADDRESS" in message
            assert lines["CONTEXT"][0].startswith("CudaError CUDA_ERROR_"), lines["CONTEXT"]  # the whole process
    assert lines["TAKEN-AFTER"] == ["b'm2'"]  # done before the failure: still readable
    for call in lines["CALL"]:
        name, outcome, seconds = call.split()
        assert outcome == cls and float(seconds) < 1.0, call
    assert lines["STATS"] == [f"{'hung' if hang else 'faulted'} True"]
    seconds, warned, closed, outcome = lines["CLOSE"][0].split()
    assert float(seconds) < 1.0 and closed == "closed=True" and outcome == "returned", lines["CLOSE"]
    assert (warned != "warnings=0") == hang  # "its memory is not freed" after a hang only


def check_batch(lines: dict, out: str, backend: str, kind: str) -> None:
    hang = kind == "hang"
    cls = "PluginHung" if hang else "KernelFault"
    assert check_error(lines, out, cls, kind, (0.9, 3.0) if hang else (0.0, 1.0)) == "msg_id=None batch=1"
    if backend == "cuda" and not hang:
        assert "the CUDA context of device 0 is lost: batch 1 of a BatchProcessor failed with" in lines["MESSAGE"][0]
        assert lines["CONTEXT"][0].startswith("CudaError CUDA_ERROR_"), lines["CONTEXT"]
    name, outcome, seconds = lines["CALL"][0].split()
    assert outcome == cls and float(seconds) < 1.0
    seconds, warned, closed, outcome = lines["CLOSE"][0].split()
    assert float(seconds) < 1.0 and closed == "closed=True" and outcome == "returned", lines["CLOSE"]
    assert (warned != "warnings=0") == hang


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trap", "hang"])
def test_sim_queue_in_a_child_process(kind):
    lines, out, exit_s = run_child("queue", "sim", kind, 60)
    check_queue(lines, out, "sim", kind)
    assert exit_s < 2.0, f"the exit took {exit_s:.1f} s"


@pytest.mark.slow
def test_sim_batch_processor_in_a_child_process():
    lines, out, exit_s = run_child("batch", "numpy", "trap", 60)
    check_batch(lines, out, "numpy", "trap")
    assert exit_s < 2.0


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["exit-hung", "exit-detected"])
def test_sim_exit_with_a_twin_that_never_returns(scenario):
    """No close(): the interpreter exits with the simulated kernel's thread in the twin (a daemon):
    at once once the watchdog has found it, within the exit's 2 s wait for the kernel otherwise."""
    lines, out, exit_s = run_child(scenario, "sim", "hang", 60)
    if scenario == "exit-detected":
        assert lines["ERROR"][0].startswith("PluginHung") and exit_s < 1.5, (exit_s, out[-2000:])
    else:
        assert lines["EXITING"] == ["running"] and exit_s < 4.0, (exit_s, out[-2000:])


# On the GPU: each case in its own process (a fault loses the context of the whole process; a hang
# keeps the device until it exits).  The bound covers NVRTC compiling the plugin (cached after).


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trap", "illegal", "hang"])
def test_gpu_queue_fault_in_a_child_process(gpu, kind):
    lines, out, exit_s = run_child("queue", "cuda", kind, 180)
    check_queue(lines, out, "cuda", kind)
    assert exit_s < 5.0, f"the exit took {exit_s:.1f} s{' with the kernel still running' if kind == 'hang' else ''}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trap", "illegal", "hang"])
def test_gpu_batch_processor_fault_in_a_child_process(gpu, kind):
    lines, out, exit_s = run_child("batch", "cuda", kind, 180)
    check_batch(lines, out, "cuda", kind)
    assert exit_s < 5.0, f"the exit took {exit_s:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["exit-hung", "exit-detected"])
def test_gpu_exit_with_a_kernel_that_never_returns(gpu, scenario):
    """The process exits with the persistent kernel still in the plugin (we never destroy the
    context; the driver tears it down with the process): status 0, within the exit's 2 s wait."""
    lines, out, exit_s = run_child(scenario, "cuda", "hang", 180)
    if scenario == "exit-detected":
        assert lines["ERROR"][0].startswith("PluginHung") and exit_s < 5.0, (exit_s, out[-2000:])
    else:
        assert lines["EXITING"] == ["running"] and exit_s < 8.0, (exit_s, out[-2000:])
