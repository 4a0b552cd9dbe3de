"""A process whose plugin faults or never returns (tests/test_faults.py runs it with a time bound).

    python tests/fault_child.py SCENARIO BACKEND KIND

SCENARIO: "queue" (a GpuQueue: three messages go through, the fourth meets the bad plugin; then
every waiter is called, close(), exit), "batch" (a BatchProcessor: a good batch, then a bad one,
then another; close(), exit), "exit-hung" (a queue whose plugin hangs with the watchdog off: the
interpreter exits with the kernel still running, no close()), "exit-detected" (the watchdog finds
the hang, then the interpreter exits without close()).
BACKEND: "cuda" or "sim" for the queue scenarios, "cuda" or "numpy" for "batch".
KIND: "trap" (``__trap()``; the twin raises), "illegal" (a write to address 8; the twin raises),
"hang" (an endless loop; the twin waits on an Event nobody sets).  msg_id (a batch's index) 3 and
later are bad; 0 .. 2 are echoed.

Each step prints one line the parent checks: ERROR <class> <seconds> msg_id=<id> batch=<n>,
MESSAGE <text>, CALL <name> <outcome> <seconds>, STATS <kernel> <fault set>, CONTEXT <what a fresh
CUDA call gives>, CLOSE <seconds> warnings=<n> closed=<bool>, then CHILD-DONE <time.time()>, so
that the parent can tell how long the exit itself took.
"""

import math
import os
import sys
import threading
import time
import warnings

SCENARIO, BACKEND, KIND = sys.argv[1:4]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpuq_driver import BatchProcessor, GpuQueue, KernelStopped, QueueConfig  # noqa: E402
from gpuq_driver.plugins import Plugin  # noqa: E402

HEAD = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)out_cap;
"""
TAIL = """\
  for (uint32_t i = lane; i < len; i += 32u) out[i] = in[i];
  return len;
}
"""
BAD = {
    "trap": "  if (msg_id >= 3u) __trap();\n",
    # the address depends on len, so the compiler cannot see that it is constant (and drop the store)
    "illegal": ("  if (msg_id >= 3u) *reinterpret_cast<volatile uint32_t*>(8ull + (len & 0x40000000u)) = lane;\n"),
    # a volatile read every time round, so the loop cannot be removed; it never ends
    "hang": "  if (msg_id >= 3u) { volatile uint32_t spin = 0u; while (spin == 0u) __nanosleep(1000); }\n",
}
NEVER = threading.Event()
KEEP = []  # the queue or processor lives until the interpreter exits (its exit handling, not gc, is tested)


def twin(payload, msg_id):
    if msg_id >= 3:
        if KIND == "hang":
            NEVER.wait()
        raise ZeroDivisionError(f"{KIND} in the twin")
    return bytes(payload)


PLUGIN = Plugin.from_source(f"bad_{KIND}", HEAD + BAD[KIND] + TAIL, twin=twin)
WATCHDOG_MS = math.inf if SCENARIO == "exit-hung" else 1000.0


def timed(call):
    start = time.monotonic()
    try:
        call()
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        outcome = type(exc).__name__
    return outcome, time.monotonic() - start


def report(err: KernelStopped, start: float) -> None:
    print(
        f"ERROR {type(err).__name__} {time.monotonic() - start:.3f} msg_id={err.msg_id} batch={err.batch}", flush=True
    )
    print("MESSAGE " + str(err).replace("\n", " "), flush=True)


def context_after() -> None:
    """What a fresh CUDA call on the device gives now (after a fault: the sticky error)."""
    if BACKEND != "cuda" or KIND == "hang":
        return
    from gpuq_driver import driver

    try:
        driver.DeviceBuffer(driver.primary_context(0), 16).close()
        print("CONTEXT fine", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"CONTEXT {type(exc).__name__} {getattr(exc, 'name', '')}", flush=True)


def close(obj) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome, seconds = timed(obj.close)
    print(f"CLOSE {seconds:.3f} warnings={len(caught)} closed={obj.closed} {outcome}", flush=True)


def queue() -> None:
    config = QueueConfig(capacity=16, slot_bytes=64, plugin=PLUGIN, backend=BACKEND, watchdog_ms=WATCHDOG_MS)
    q = GpuQueue(config)
    KEEP.append(q)
    assert q.wait_result(q.enqueue(b"m0"), timeout=30) == b"m0"
    assert q.wait_result(q.enqueue(b"m1"), timeout=30) == b"m1"
    m2 = q.enqueue(b"m2")  # done but not taken before the fault: it stays readable
    deadline = time.monotonic() + 30
    while m2 not in q.poll_completions():
        assert time.monotonic() < deadline, q.stats()
        time.sleep(1e-3)
    start = time.monotonic()
    bad = q.enqueue(b"m3")  # one bad message: a second enqueue might launch into the lost context and raise
    if SCENARIO == "exit-hung":
        time.sleep(0.3)
        print(f"EXITING {q.stats().kernel}", flush=True)
        print(f"CHILD-DONE {time.time():.3f}", flush=True)
        return  # no close(): the interpreter exits with the kernel in the plugin
    try:
        q.wait_result(bad, timeout=None)
        print("ERROR none", flush=True)
        return
    except KernelStopped as err:
        report(err, start)
    if SCENARIO == "exit-detected":
        print(f"CHILD-DONE {time.time():.3f}", flush=True)
        return  # no close()
    print(f"TAKEN-AFTER {q.try_dequeue_result(m2)!r}", flush=True)
    calls = {
        "enqueue": lambda: q.enqueue(b"x", timeout=1),
        "wait_result": lambda: q.wait_result(bad, timeout=None),  # again: it is still not taken
        "poll_completions": q.poll_completions,
        "pause": lambda: q.pause(timeout=5),
        "shutdown": lambda: q.shutdown(timeout=5),
    }
    for name, call in calls.items():
        outcome, seconds = timed(call)
        print(f"CALL {name} {outcome} {seconds:.3f}", flush=True)
    s = q.stats()
    print(f"STATS {s.kernel} {bool(s.fault)}", flush=True)
    context_after()
    close(q)
    print(f"CHILD-DONE {time.time():.3f}", flush=True)


def batch() -> None:
    proc = BatchProcessor(slot_bytes=64, max_batch=16, plugin=PLUGIN, backend=BACKEND, watchdog_ms=WATCHDOG_MS)
    KEEP.append(proc)
    assert proc.process([b"a", b"b"]) == [b"a", b"b"]
    start = time.monotonic()
    try:
        proc.process([b"x"] * 8)
        print("ERROR none", flush=True)
        return
    except KernelStopped as err:
        report(err, start)
    outcome, seconds = timed(lambda: proc.process([b"a"]))
    print(f"CALL process {outcome} {seconds:.3f}", flush=True)
    context_after()
    close(proc)
    print(f"CHILD-DONE {time.time():.3f}", flush=True)


if __name__ == "__main__":
    (batch if SCENARIO == "batch" else queue)()
