"""Conformance: one traffic script through GpuQueue on the simulator and, where a GPU exists, on the
real persistent kernel.  Every result is checked byte for byte against the plugin's twin, and what
the script observes (results, the errors raised and their messages, the counters enqueued /
processed / taken / pending / occupied at quiescent points) must be the same on both backends.
Then BatchProcessor: its NumPy path against the twin, its CUDA path against the NumPy path.

The script: mixed sizes 0 .. slot_bytes (slot_bytes itself too), a plugin that returns more than
slot_bytes (BAD_RESULT), a plugin that fails messages with status codes (GPUQ_FAIL / plugins.Fail:
MessageFailed), the built-in score with per-queue params (its results compared to the twin's within
float32 rounding: the device's FMA order differs from NumPy's), a full ring (QueueFull), results
taken out of order, pause/resume, shutdown(drain=True) and shutdown(drain=False).  The "cuda" legs
skip with the reason without a GPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpuq_driver import (
    BatchProcessor,
    CompileOptions,
    GpuQueue,
    MessageFailed,
    QueueConfig,
    ResultTimeout,
    compiler,
)
from gpuq_driver.batch import FAILED
from gpuq_driver.plugins import Fail, Plugin, resolve

CAPACITY, SLOT = 8, 64
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, SLOT]
FLOAT_SIZES = [0, 6, 4, 8, 20, 12, 16, 24, 32, 48, 63, SLOT]  # score: every failure code, then scores

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

# Fails messages by their length, with the codes at the edges: len % 3 == 1 fails with code len;
# len == 2 with GPUQ_FAIL(0) (code 0); other len % 3 == 2 return (uint32_t)-1 (code 65535); the
# rest echo.  Its twin raises plugins.Fail with the same codes.
FAILING_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)out_cap;
  (void)msg_id;
  if (len % 3u == 1u) return GPUQ_FAIL(0x10000u + len);  // the code keeps the low 16 bits: len
  if (len == 2u) return GPUQ_FAIL(0);
  if (len % 3u == 2u) return 0xFFFFFFFFu;
  for (uint32_t i = lane; i < len; i += 32u) out[i] = in[i];
  return len;
}
"""


def failing_twin(payload, msg_id):
    n = len(payload)
    if n % 3 == 1:
        raise Fail(n)
    if n % 3 == 2:
        raise Fail(0 if n == 2 else 65535)
    return payload


FAILING = Plugin.from_source("failing", FAILING_SOURCE, twin=failing_twin)

# score's weights: 48 float32, a [k, 48 / k] matrix for a payload of k floats.  With 64-byte slots
# (16 scores at most) that gives every outcome: k = 3, 4, 6, 8, 12, 16 score; k = 1, 2 need more
# than 16 scores (SCORE_TOO_LARGE); other k have no whole rows (SCORE_BAD_PARAMS); a payload of 0
# bytes or not a multiple of 4 is SCORE_BAD_PAYLOAD.
WEIGHTS = np.random.default_rng(80).standard_normal(48).astype(np.float32)
PLUGINS = {
    "echo": ("echo", None),
    "crc32c": ("crc32c", None),
    "double": (DOUBLE, None),
    "failing": (FAILING, None),
    "score": ("score", WEIGHTS),
}
FLOAT_PLUGINS = {"score"}  # results compared within float32 rounding, and payloads are float32 values


def payloads(n: int, seed: int, floats: bool = False) -> list[bytes]:
    """n random payloads: SIZES first, then random sizes 0 .. SLOT; floats: FLOAT_SIZES, then mostly
    sizes that score takes, each the bytes of normally distributed float32 values (cut to the size),
    not random bytes (which would include NaN and huge values whose sums depend on the order of
    addition)."""
    rng = np.random.default_rng(seed)
    if floats:  # mostly whole float32 vectors of the lengths score takes
        sizes = (FLOAT_SIZES + rng.choice(FLOAT_SIZES + [12, 16, 24, 32, 48, SLOT] * 3, n).tolist())[:n]
        return [rng.standard_normal(-(-m // 4)).astype(np.float32).tobytes()[:m] for m in sizes]
    sizes = (SIZES + rng.integers(0, SLOT + 1, n).tolist())[:n]
    return [rng.integers(0, 256, m, dtype=np.uint8).tobytes() for m in sizes]


def assert_scores_close(got: bytes, expect: bytes, what) -> None:
    """float32 scores equal within rounding: |got - expect| <= 1e-5 * sum |x_i w_ij| + 1e-30 ~ k eps."""
    g, e = np.frombuffer(got, np.float32), np.frombuffer(expect, np.float32)
    assert g.shape == e.shape, (what, g.shape, e.shape)
    np.testing.assert_allclose(
        g, e, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(e).max(initial=0))), err_msg=str(what)
    )


def twin_outcome(twin: Plugin, payload: bytes, msg_id: int, params) -> bytes | Fail:
    """The twin's result for one message, or the Fail it raised."""
    try:
        return twin.run_twin(memoryview(payload), msg_id, b"" if params is None else params, SLOT)
    except Fail as exc:
        return exc


def outcome(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


class Script:
    """Runs the traffic on one queue at a time and logs what it sees; checks every result against the twin."""

    def __init__(self, backend: str, plugin, params=None):
        self.backend, self.plugin, self.twin, self.params = backend, plugin, resolve(plugin), params
        self.floats = self.twin.name in FLOAT_PLUGINS
        self.log: list = []
        self.sent: dict[int, bytes] = {}

    def queue(self) -> GpuQueue:
        return GpuQueue(
            QueueConfig(
                capacity=CAPACITY, slot_bytes=SLOT, plugin=self.plugin, backend=self.backend, params=self.params
            )
        )

    def send(self, q: GpuQueue, payload: bytes) -> int:
        m = q.enqueue(payload)
        self.sent[m] = payload
        return m

    def take(self, q: GpuQueue, m: int) -> None:
        expect = twin_outcome(self.twin, self.sent[m], m, self.params)
        try:
            got = q.wait_result(m, timeout=10.0)
        except MessageFailed as exc:  # the plugin failed it: only where the twin raised Fail, same code
            assert isinstance(expect, Fail), (m, outcome(exc))
            assert (exc.msg_id, exc.code, exc.plugin) == (m, expect.code, self.twin.name), (m, outcome(exc))
            self.log.append(("result", m, *outcome(exc)))
            return
        except Exception as exc:  # BAD_RESULT: ProtocolError, only where the twin's result is too long
            assert not isinstance(expect, Fail) and len(expect) > SLOT and "BAD_RESULT" in str(exc), (m, outcome(exc))
            self.log.append(("result", m, *outcome(exc)))
            return
        assert not isinstance(expect, Fail), f"msg_id {m}: a result, but the twin failed it with code {expect.code}"
        if self.floats:  # equal within rounding; the log holds what both backends agree on
            assert_scores_close(got, expect, (m, len(self.sent[m])))
            self.log.append(("result", m, "scores", len(got)))
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
        data = iter(payloads(6 * CAPACITY, seed=81, floats=self.floats))
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


def test_failures_and_scores_in_the_script_on_the_simulator():
    """The failing plugin and score fail some messages (MessageFailed, the same codes as their twins),
    the queue goes on, and shutdown reports no protocol error for them."""
    for plugin, params in (PLUGINS["failing"], PLUGINS["score"]):
        log = Script("sim", plugin, params).run()
        results = [entry for entry in log if entry[0] == "result"]
        failed = [entry for entry in results if entry[2] == "MessageFailed"]
        assert 0 < len(failed) < len(results) - 10, plugin
        assert {e[3].split(" with code ")[1] for e in failed} >= (
            {"0", "1", "16", "64", "65535"} if plugin is FAILING else {"1", "2", "3"}
        )
        log = {entry[0]: entry[1:] for entry in log if entry[0] != "result"}
        assert log["shutdown(drain=True)"] == ("returned", None) and log["drained, all taken"] == (35, 35, 35, 0, 0)


@pytest.mark.parametrize("plugin, params", PLUGINS.values(), ids=PLUGINS.keys())
def test_the_backends_agree(backend, plugin, params):
    """Every result matches the twin (checked as it is taken); on the GPU the whole log equals the simulator's."""
    log = Script(backend, plugin, params).run()
    assert sum(entry[0] == "result" for entry in log) == 2 * CAPACITY + CAPACITY + 3 + CAPACITY + 2
    if backend == "cuda":
        sim = Script("sim", plugin, params).run()
        diff = [(i, c, s) for i, (c, s) in enumerate(zip(log, sim)) if c != s]
        assert len(log) == len(sim) and not diff, f"cuda and sim differ (index, cuda, sim): {diff[:5]}"


@pytest.mark.parametrize("plugin", [DOUBLE, FAILING], ids=["double", "failing"])
def test_the_test_plugins_compile(tmp_path, monkeypatch, plugin):
    """The contract-breaking and the failing plugins' device code compiles for both kernels (no GPU needed)."""
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path))
    for source in ("gpuq_queue.cu", "gpuq_batch.cu"):
        assert compiler.compile_cubin(source, CompileOptions(arch="sm_90", plugin=plugin))


# -- BatchProcessor: the NumPy path against the twin, the CUDA path against the NumPy path -----------


def batch_run(proc_backend: str, plugin, params) -> tuple[list, dict, list, list, list]:
    """process() of mixed sizes (MessageFailed caught: its results and failures), process_packed()
    with an oversized payload among them: (results, failures, packed sizes, packed results split by
    size, packed failure codes)."""
    data = payloads(100, seed=82, floats=resolve(plugin).name in FLOAT_PLUGINS)
    with BatchProcessor(slot_bytes=SLOT, max_batch=128, plugin=plugin, backend=proc_backend, params=params) as proc:
        try:
            results, failures = proc.process(data), {}
        except MessageFailed as exc:
            assert (exc.msg_id, exc.code) == min(exc.failures.items()) and exc.plugin == proc.plugin.name
            results, failures = exc.results, exc.failures
        packed = data[:20] + [b"y" * (SLOT + 1)] + data[20:40]
        lens, out, codes = proc.process_packed([len(p) for p in packed], b"".join(packed), fail_codes=True)
        assert proc.messages == len(data) + len(packed) and proc.batches == 2
    split, start = [], 0
    for m in lens.tolist():
        split.append(None if m == FAILED else bytes(out[start : start + m]))
        start += 0 if m == FAILED else m
    return results, failures, lens.tolist(), split, codes.tolist()


@pytest.mark.parametrize("plugin, params", PLUGINS.values(), ids=PLUGINS.keys())
def test_batch_processor_numpy_matches_the_twin(plugin, params):
    twin = resolve(plugin)
    data = payloads(100, seed=82, floats=twin.name in FLOAT_PLUGINS)
    outcomes = [twin_outcome(twin, p, i, params) for i, p in enumerate(data)]
    expect = [None if isinstance(r, Fail) or len(r) > SLOT else r for r in outcomes]
    results, failures, lens, split, codes = batch_run("numpy", plugin, params)
    assert results == expect
    assert failures == {i: r.code for i, r in enumerate(outcomes) if isinstance(r, Fail)}
    assert lens[20] == FAILED and lens[:20] == [FAILED if r is None else len(r) for r in expect[:20]]
    assert split[:20] == expect[:20]
    assert codes[20] == -1 and codes[:20] == [r.code if isinstance(r, Fail) else -1 for r in outcomes[:20]]
    if plugin in (FAILING, "score"):
        assert failures and len(failures) < 90  # some fail, most do not
    else:
        assert not failures


@pytest.mark.parametrize("plugin, params", PLUGINS.values(), ids=PLUGINS.keys())
def test_batch_processor_cuda_matches_numpy(gpu, plugin, params):
    cuda, numpy = batch_run("cuda", plugin, params), batch_run("numpy", plugin, params)
    assert cuda[1:3] == numpy[1:3] and cuda[4] == numpy[4]  # failures, sizes, codes
    pairs = list(zip(cuda[0] + cuda[3], numpy[0] + numpy[3]))
    assert len(cuda[0]) == len(numpy[0]) and len(cuda[3]) == len(numpy[3])
    if resolve(plugin).name in FLOAT_PLUGINS:
        for i, (c, n) in enumerate(pairs):
            assert (c is None) == (n is None), i
            if c is not None:
                assert_scores_close(c, n, i)
        return
    mismatched = [(i, c, n) for i, (c, n) in enumerate(pairs) if c != n]
    assert not mismatched, f"(index, cuda, numpy): {mismatched[:3]}"
