"""Conformance: one traffic script through GpuQueue on the simulator and, where a GPU exists, on the
real persistent kernel.  Every result is checked byte for byte against the plugin's twin, and what
the script observes (results, the errors raised and their messages, the counters enqueued /
processed / taken / pending / occupied at quiescent points) must be the same on both backends.
Then BatchProcessor: its NumPy path against the twin, its CUDA path against the NumPy path.

The script: mixed sizes 0 .. slot_bytes (slot_bytes itself too), a plugin that returns more than
slot_bytes (BAD_RESULT), a full ring (QueueFull), results taken out of order, pause/resume,
shutdown(drain=True) and shutdown(drain=False).  The "cuda" legs skip with the reason without a GPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpuq_driver import (
    BatchProcessor,
    CompileOptions,
    GpuQueue,
    QueueConfig,
    ResultTimeout,
    compiler,
)
from gpuq_driver.batch import FAILED
from gpuq_driver.plugins import Plugin, resolve

CAPACITY, SLOT = 8, 64
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, SLOT]

# The payload twice; a payload longer than out_cap / 2 returns too long a length, writing nothing:
# a plugin that breaks the contract (BAD_RESULT), the same in its twin.
DOUBLE_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)msg_id;
  if (2u * len > out_cap) return 2u * len;
  for (uint32_t i = lane; i < len; i += 32u) {
    out[i] = in[i];
    out[len + i] = in[i];
  }
  return 2u * len;
}
"""


def double_twin(payload, msg_id):
    return bytes(payload) * 2


DOUBLE = Plugin.from_source("double", DOUBLE_SOURCE, twin=double_twin)
PLUGINS = {"echo": "echo", "crc32c": "crc32c", "double": DOUBLE}


def payloads(n: int, seed: int) -> list[bytes]:
    """n random payloads: SIZES first, then random sizes 0 .. SLOT."""
    rng = np.random.default_rng(seed)
    sizes = (SIZES + rng.integers(0, SLOT + 1, n).tolist())[:n]
    return [rng.integers(0, 256, m, dtype=np.uint8).tobytes() for m in sizes]


def outcome(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


class Script:
    """Runs the traffic on one queue at a time and logs what it sees; checks every result against the twin."""

    def __init__(self, backend: str, plugin):
        self.backend, self.plugin, self.twin = backend, plugin, resolve(plugin)
        self.log: list = []
        self.sent: dict[int, bytes] = {}

    def queue(self) -> GpuQueue:
        return GpuQueue(QueueConfig(capacity=CAPACITY, slot_bytes=SLOT, plugin=self.plugin, backend=self.backend))

    def send(self, q: GpuQueue, payload: bytes) -> int:
        m = q.enqueue(payload)
        self.sent[m] = payload
        return m

    def take(self, q: GpuQueue, m: int) -> None:
        expect = self.twin.run_twin(memoryview(self.sent[m]), m)
        try:
            got = q.wait_result(m, timeout=10.0)
        except Exception as exc:  # BAD_RESULT: ProtocolError, only where the twin's result is too long
            assert len(expect) > SLOT and "BAD_RESULT" in str(exc), (m, outcome(exc))
            self.log.append(("result", m, *outcome(exc)))
            return
        assert got == expect, f"msg_id {m} ({len(self.sent[m])} bytes): {got.hex()} != twin {expect.hex()}"
        self.log.append(("result", m, got))

    def attempt(self, what: str, call) -> None:
        """Log what ``call()`` returns or raises."""
        try:
            self.log.append((what, "returned", call()))
        except Exception as exc:
            self.log.append((what, *outcome(exc)))

    def counters(self, q: GpuQueue, where: str, settle: bool = True, *extra: str) -> None:
        """Log the counters; settle: first wait until the device has processed everything enqueued."""
        deadline = time.monotonic() + 10.0
        while settle and q.stats().pending:
            assert time.monotonic() < deadline, f"{where}: not processed within 10 s: {q.stats()}"
            q.poll_completions(0)  # launches a lease if messages wait and none runs
            time.sleep(1e-3)
        s = q.stats()
        self.log.append(
            (where, s.enqueued, s.processed, s.taken, s.pending, s.occupied, *(getattr(s, f) for f in extra))
        )

    def run(self) -> list:
        data = iter(payloads(6 * CAPACITY, seed=81))
        q = self.queue()
        # mixed sizes: one at a time first (on the GPU many warps run at once, and the first
        # BAD_RESULT that shutdown reports must be the same message on both backends), then a ring
        for _ in range(CAPACITY):
            self.take(q, self.send(q, next(data)))
        ids = [self.send(q, next(data)) for _ in range(CAPACITY)]
        for m in ids:
            self.take(q, m)
        self.counters(q, "sizes")
        # a full ring: QueueFull names the msg_id that holds it up
        ids = [self.send(q, next(data)) for _ in range(CAPACITY)]
        self.counters(q, "full")
        self.attempt("enqueue into a full ring", lambda: q.enqueue(b"x", timeout=0))
        # out of order: the newest first frees no slot; taken twice is None / UnknownMessage
        for m in (ids[-1], ids[CAPACITY // 2]):
            self.take(q, m)
        self.counters(q, "out of order")
        self.attempt("enqueue after out-of-order takes", lambda: q.enqueue(b"x", timeout=0))
        self.attempt("take again", lambda: q.try_dequeue_result(ids[-1]))
        self.attempt("wait again", lambda: q.wait_result(ids[-1], timeout=1.0))
        for m in ids[: CAPACITY // 2] + ids[CAPACITY // 2 + 1 : -1]:
            self.take(q, m)
        self.counters(q, "all taken")
        # pause / resume: nothing is processed while paused
        with q.paused():
            ids = [self.send(q, next(data)) for _ in range(3)]
            time.sleep(0.05)
            self.counters(q, "paused", False, "kernel")
            self.attempt("take while paused", lambda: q.try_dequeue_result(ids[0]))
            self.attempt("wait while paused", lambda: q.wait_result(ids[0], timeout=0.01))
        for m in ids:
            self.take(q, m)
        self.counters(q, "resumed")
        # shutdown(drain=True): everything enqueued is processed, then nothing is accepted
        ids = [self.send(q, next(data)) for _ in range(CAPACITY)]
        self.attempt("shutdown(drain=True)", lambda: q.shutdown(drain=True))
        self.counters(q, "drained", False, "kernel")
        self.attempt("enqueue after shutdown", lambda: q.enqueue(b"x"))
        for m in ids:
            self.take(q, m)
        self.counters(q, "drained, all taken", False)
        self.attempt("close", q.close)
        # shutdown(drain=False) on a new queue: what waited (paused) is never processed
        self.sent.clear()
        q = self.queue()
        try:
            ids = [self.send(q, bytes([i]) * 8) for i in range(2)]
            for m in ids:
                self.take(q, m)
            q.pause()
            ids = [self.send(q, bytes([i]) * 8) for i in range(3)]
            self.attempt("shutdown(drain=False)", lambda: q.shutdown(drain=False))
            self.counters(q, "aborted", False, "kernel")
            self.attempt("wait after abort", lambda: q.wait_result(ids[0], timeout=5.0))
            self.attempt("take after abort", lambda: q.try_dequeue_result(ids[0]))
            self.attempt("enqueue after abort", lambda: q.enqueue(b"x"))
        finally:
            self.attempt("close", q.close)
        return self.log


def test_the_script_sees_what_it_should_on_the_simulator():
    """The log itself, on the simulator, for the plugin that breaks its contract."""
    log = {entry[0]: entry[1:] for entry in Script("sim", DOUBLE).run() if entry[0] != "result"}
    assert log["sizes"] == (16, 16, 16, 0, 0)
    assert log["full"] == (24, 24, 16, 0, CAPACITY)
    assert log["enqueue into a full ring"][0] == "QueueFull"
    assert "the slot for msg_id 24 frees when msg_id 16 is taken" in log["enqueue into a full ring"][1]
    assert log["out of order"] == (24, 24, 18, 0, CAPACITY - 2)
    assert log["enqueue after out-of-order takes"][0] == "QueueFull"
    assert log["take again"] == ("returned", None)
    assert log["wait again"][0] == "UnknownMessage"
    assert log["all taken"] == (24, 24, 24, 0, 0)
    assert log["paused"] == (27, 24, 24, 3, 3, "paused")
    assert log["take while paused"] == ("returned", None)
    assert log["wait while paused"][0] == ResultTimeout.__name__
    assert log["resumed"] == (27, 27, 27, 0, 0)
    assert log["shutdown(drain=True)"] == ("ProtocolError", "device reported BAD_RESULT at msg_id 7")
    assert log["drained"] == (35, 35, 27, 0, CAPACITY, "exited")
    assert log["enqueue after shutdown"][0] == "QueueClosed"
    assert log["drained, all taken"] == (35, 35, 35, 0, 0)
    assert log["aborted"] == (5, 2, 2, 3, 3, "exited")
    assert log["wait after abort"][0] == "KernelStopped"
    assert log["take after abort"] == ("returned", None)
    assert log["enqueue after abort"][0] == "QueueClosed"
    assert log["close"] == ("returned", None)


@pytest.mark.parametrize("plugin", PLUGINS.values(), ids=PLUGINS.keys())
def test_the_backends_agree(backend, plugin):
    """Every result matches the twin (checked as it is taken); on the GPU the whole log equals the simulator's."""
    log = Script(backend, plugin).run()
    assert sum(entry[0] == "result" for entry in log) == 2 * CAPACITY + CAPACITY + 3 + CAPACITY + 2
    if backend == "cuda":
        sim = Script("sim", plugin).run()
        diff = [(i, c, s) for i, (c, s) in enumerate(zip(log, sim)) if c != s]
        assert len(log) == len(sim) and not diff, f"cuda and sim differ (index, cuda, sim): {diff[:5]}"


def test_the_double_plugin_compiles(tmp_path, monkeypatch):
    """The contract-breaking plugin's device code compiles for both kernels (no GPU needed)."""
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path))
    for source in ("gpuq_queue.cu", "gpuq_batch.cu"):
        assert compiler.compile_cubin(source, CompileOptions(arch="sm_90", plugin=DOUBLE))


# -- BatchProcessor: the NumPy path against the twin, the CUDA path against the NumPy path -----------


def batch_run(proc_backend: str, plugin) -> tuple[list, list, bytes]:
    """process() of mixed sizes, process_packed() with an oversized payload among them."""
    data = payloads(100, seed=82)
    with BatchProcessor(slot_bytes=SLOT, max_batch=128, plugin=plugin, backend=proc_backend) as proc:
        results = proc.process(data)
        packed = data[:20] + [b"y" * (SLOT + 1)] + data[20:40]
        lens, out = proc.process_packed([len(p) for p in packed], b"".join(packed))
        assert proc.messages == len(data) + len(packed) and proc.batches == 2
    return results, lens.tolist(), bytes(out)


@pytest.mark.parametrize("plugin", PLUGINS.values(), ids=PLUGINS.keys())
def test_batch_processor_numpy_matches_the_twin(plugin):
    twin = resolve(plugin)
    data = payloads(100, seed=82)
    expect = [twin.run_twin(memoryview(p), i) for i, p in enumerate(data)]
    expect = [r if len(r) <= SLOT else None for r in expect]
    results, lens, out = batch_run("numpy", plugin)
    assert results == expect
    assert lens[20] == FAILED and lens[:20] == [FAILED if r is None else len(r) for r in expect[:20]]
    assert out.startswith(b"".join(r for r in expect[:20] if r is not None))


@pytest.mark.parametrize("plugin", PLUGINS.values(), ids=PLUGINS.keys())
def test_batch_processor_cuda_matches_numpy(gpu, plugin):
    cuda, numpy = batch_run("cuda", plugin), batch_run("numpy", plugin)
    assert cuda[1:] == numpy[1:]
    mismatched = [(i, c, n) for i, (c, n) in enumerate(zip(cuda[0], numpy[0])) if c != n]
    assert len(cuda[0]) == len(numpy[0]) and not mismatched, f"(index, cuda, numpy): {mismatched[:3]}"
