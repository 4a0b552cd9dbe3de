"""Per-queue params, per-message status and the built-in ``score`` (issue 8 items 2-4).

- params: QueueConfig(params=) / BatchProcessor(params=) validation (ConfigError naming the field
  and the limit), an immutable copy (hashable, compared by content, repr by size), reaching the
  twin (by keyword, only to twins that name it) and the device (``gpuq_params()``);
- status: a plugin returns GPUQ_FAIL(code) / a twin raises plugins.Fail(code): MessageFailed
  when taken (msg_id, code, plugin named), the slot freed, the queue going on, no protocol error;
  BatchProcessor raises it after the batch with every result and code;
- score: x @ W against NumPy, its failure codes, its device code compiled by NVRTC.

Tests taking ``make_queue`` run on the simulator and, where a GPU exists, on the real kernel; those
taking ``gpu`` only there (skipped with the reason here).
"""

from __future__ import annotations

import ctypes
import pickle
import re
import time

import numpy as np
import pytest

from gpuq_driver import (
    BatchProcessor,
    CompileOptions,
    ConfigError,
    GpuqError,
    GpuQueue,
    MessageFailed,
    ProtocolError,
    QueueConfig,
    compiler,
)
from gpuq_driver.batch import FAILED
from gpuq_driver.params import MAX_PARAMS_BYTES, PluginParams, check_params
from gpuq_driver.plugins import (
    FAIL_BIT,
    MAX_FAIL_CODE,
    SCORE_BAD_PARAMS,
    SCORE_BAD_PAYLOAD,
    SCORE_TOO_LARGE,
    Fail,
    Plugin,
    available,
    resolve,
    score_twin,
)

API = (compiler.DEVICE_SRC / "gpuq_plugin_api.cuh").read_text()
SCORE = (compiler.DEVICE_SRC / "plugins" / "score.cuh").read_text()

# The params bytes from the offset the payload gives (8 bytes, little-endian), as many as fit in a
# slot: what the device reads through gpuq_params(), byte for byte.  Fails with code 9 for a payload
# that is not 8 bytes, 7 when the queue has no params (nullptr, 0), 8 for an offset past the end.
PEEK_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)msg_id;
  if (len != 8u) return GPUQ_FAIL(9);
  const uint8_t* p = gpuq_params();
  const uint64_t bytes = gpuq_params_bytes();
  if (p == nullptr || bytes == 0u) return GPUQ_FAIL(p == nullptr && bytes == 0u ? 7u : 6u);
  const uint64_t off = *reinterpret_cast<const uint64_t*>(in);
  if (off > bytes) return GPUQ_FAIL(8);
  const uint32_t n = bytes - off < out_cap ? static_cast<uint32_t>(bytes - off) : out_cap;
  for (uint32_t i = lane; i < n; i += 32u) out[i] = p[off + i];
  return n;
}
"""


def peek_twin(payload, msg_id, params, out_cap):
    if len(payload) != 8:
        raise Fail(9)
    if not params:
        raise Fail(7)
    off = int.from_bytes(payload, "little")
    if off > len(params):
        raise Fail(8)
    return params[off : off + out_cap]


PEEK = Plugin.from_source("peek", PEEK_SOURCE, twin=peek_twin)

# Fails every message whose first byte is odd, with code msg_id % 1000 + 1; echoes the others.
ODD_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)out_cap;
  if (len > 0u && (in[0] & 1u)) return GPUQ_FAIL(msg_id % 1000u + 1u);
  for (uint32_t i = lane; i < len; i += 32u) out[i] = in[i];
  return len;
}
"""


def odd_twin(payload, msg_id):
    if len(payload) and payload[0] & 1:
        raise Fail(msg_id % 1000 + 1)
    return payload


ODD = Plugin.from_source("odd", ODD_SOURCE, twin=odd_twin)


# -- params: validation and storage ----------------------------------------------------------------


def test_params_are_kept_as_an_immutable_copy():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    c = QueueConfig(plugin="score", params=w)
    assert type(c.params) is bytes and c.params == w.tobytes()
    w[0, 0] = 99  # the caller's array changes; the config does not
    assert c.params == np.arange(12, dtype=np.float32).tobytes()
    raw = b"\x01\x02\x03"
    assert QueueConfig(params=raw).params is raw  # bytes are immutable already: no copy
    buf = bytearray(b"abc")
    c = QueueConfig(params=buf)
    buf[0] = 0
    assert c.params == b"abc"
    assert QueueConfig(params=memoryview(b"xy")).params == b"xy"
    assert QueueConfig().params == QueueConfig(params=None).params == QueueConfig(params=b"").params == b""
    assert QueueConfig(params=np.zeros(0, np.float32)).params == b""


def test_configs_with_params_hash_and_compare_by_content_and_repr_by_size():
    w = np.ones((4, 4), np.float32)
    a, b = QueueConfig(plugin="score", params=w), QueueConfig(plugin="score", params=w.tobytes())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != QueueConfig(plugin="score", params=np.zeros((4, 4), np.float32))
    assert "params=<64 bytes>" in repr(a) and "\\x00" not in repr(a)
    assert repr(QueueConfig()).endswith("params=b'', one_read=False, scouts=0, result_memory='host')") and repr(
        QueueConfig()
    ).startswith("QueueConfig(capacity=1024, slot_bytes=512, plugin='echo',")
    assert "params=<1,048,576 bytes>" in repr(QueueConfig(params=bytes(1 << 20)))


@pytest.mark.parametrize(
    "value, message",
    [
        ("weights", r"params=str object: params must be a bytes-like object"),
        (3.5, r"params=float object: params must be a bytes-like object"),
        (np.ones((4, 4), np.float32)[:, ::2], r"params=ndarray object: params must be C-contiguous"),
        (np.array([object(), 1]), r"params=ndarray object: params of format 'O' holds object pointers"),
    ],
)
def test_bad_params_are_refused_naming_the_field(value, message):
    for make in (lambda: QueueConfig(params=value), lambda: BatchProcessor(params=value, backend="numpy")):
        with pytest.raises(ConfigError, match=message):
            make()


def test_params_larger_than_1_gib_are_refused_naming_the_limit():
    assert MAX_PARAMS_BYTES == 1 << 30
    too_big = np.empty(MAX_PARAMS_BYTES + 1, np.uint8)  # never touched: refused before any copy
    message = re.escape("params=1,073,741,825 bytes exceeds the limit: params <= 1,073,741,824 bytes (1 GiB")
    with pytest.raises(ConfigError, match=message):
        QueueConfig(params=too_big)
    with pytest.raises(ConfigError, match=message):
        BatchProcessor(params=too_big, backend="numpy")
    assert len(check_params(memoryview(too_big)[:16], "weights")) == 16


def test_the_plugin_api_header_matches_the_python_side():
    assert re.search(r"^struct GpuqParams \{\s*const uint8_t\* ptr;.*?\n\s*uint64_t bytes;.*?\n\};", API, re.M | re.S)
    assert [f[0] for f in PluginParams._fields_] == ["ptr", "bytes"] and ctypes.sizeof(PluginParams) == 16
    assert "extern __device__ GpuqParams gpuq_params_g;" in API
    assert re.search(r"const uint8_t\* gpuq_params\(\) \{ return gpuq_params_g\.ptr; \}", API)
    assert re.search(r"uint64_t gpuq_params_bytes\(\) \{ return gpuq_params_g\.bytes; \}", API)
    assert (
        "#define GPUQ_FAIL(code) (0x80000000u | ((uint32_t)(code) & 0xFFFFu))" in API
        and f"#define GPUQ_FAIL_BIT {FAIL_BIT:#x}u" in API
        and MAX_FAIL_CODE == 0xFFFF
    )
    for src in ("gpuq_queue.cu", "gpuq_batch.cu"):  # included before the plugin, defined once in each
        text = (compiler.DEVICE_SRC / src).read_text()
        assert text.index('#include "gpuq_plugin_api.cuh"') < text.index("#include GPUQ_PLUGIN_FILE")
        assert text.count("__device__ GpuqParams gpuq_params_g = {nullptr, 0u};") == 1


# -- twins: Fail, and which twins get params ---------------------------------------------------------


@pytest.mark.parametrize("code", [-1, 65536, 1.0, True, "3", None])
def test_fail_takes_a_code_of_16_bits(code):
    with pytest.raises(ValueError, match=r"Fail\(code=.*\): code must be"):
        Fail(code)


def test_fail_carries_its_code():
    assert Fail(0).code == 0 and Fail(np.uint16(65535)).code == 65535
    assert str(Fail(5)) == "the plugin failed the message with code 5"


def test_a_twin_gets_params_and_out_cap_only_when_it_names_them():
    seen = {}

    def two(payload, msg_id):
        return b"2"

    def with_params(payload, msg_id, params):
        seen["params"] = params
        return bytes(params)

    def keyword_only(payload, msg_id, *, out_cap):
        return str(out_cap).encode()

    def anything(payload, msg_id, **extra):
        seen["extra"] = extra
        return b"k"

    src = ODD_SOURCE
    p = memoryview(b"")
    assert Plugin("a", src, two).twin_keywords == () and Plugin("a", src, two).run_twin(p, 0, b"P", 64) == b"2"
    plugin = Plugin("a", src, with_params)
    assert plugin.twin_keywords == ("params",) and plugin.run_twin(p, 0, b"PQ", 64) == b"PQ"
    assert isinstance(seen["params"], memoryview)
    assert plugin.run_twin(p, 0) == b""  # no params: an empty view
    assert Plugin("a", src, keyword_only).run_twin(p, 0, b"", 48) == b"48"
    assert Plugin("a", src, anything).run_twin(p, 1, b"x", 16) == b"k" and seen["extra"]["out_cap"] == 16
    assert Plugin("a", src, len).twin_keywords == ()  # a builtin, positional only
    lam = Plugin("a", src, lambda payload, msg_id, params=None: bytes(params))
    assert lam.run_twin(p, 0, b"z") == b"z"
    assert Plugin("a", src, two) == Plugin("a", src, two)  # the derived keywords are not a field


def test_the_simulator_and_numpy_batch_hand_the_twin_read_only_params():
    got = []

    def grab(payload, msg_id, params, out_cap):
        got.append((params, out_cap))
        return b""

    grabber = Plugin("grab", ODD_SOURCE, grab)
    with GpuQueue(QueueConfig(capacity=4, slot_bytes=16, plugin=grabber, params=b"weights", backend="sim")) as q:
        q.wait_result(q.enqueue(b""))
    with BatchProcessor(slot_bytes=32, max_batch=2, plugin=grabber, params=bytearray(b"w2"), backend="numpy") as proc:
        proc.process([b""])
    assert [(bytes(p), p.readonly, cap) for p, cap in got] == [(b"weights", True, 16), (b"w2", True, 32)]


# -- status: GPUQ_FAIL / Fail through GpuQueue ------------------------------------------------------------


def test_a_failed_message_raises_message_failed_and_the_queue_goes_on(make_queue):
    q = make_queue(capacity=4, slot_bytes=16, plugin=ODD)
    ids = ok, bad, later = [q.enqueue(b"\x02ok"), q.enqueue(b"\x03bad"), q.enqueue(b"\x04later")]
    polled, deadline = [], time.monotonic() + 10
    while len(polled) < 3 and time.monotonic() < deadline:
        polled += q.poll_completions()  # a failed message is a completion like any other
    assert polled == ids
    with pytest.raises(MessageFailed) as info:
        q.wait_result(bad)
    e = info.value
    assert (e.msg_id, e.code, e.plugin) == (bad, bad % 1000 + 1, "odd") and e.results is None
    assert str(e) == f"msg_id {bad}: plugin 'odd' failed the message with code {bad % 1000 + 1}"
    assert q.try_dequeue_result(bad) is None  # taken: the slot is freed
    assert q.try_dequeue_result(ok) == b"\x02ok" and q.wait_result(later) == b"\x04later"
    for i in range(40):  # the ring wraps many times past the failed slots
        m = q.enqueue(bytes([i]) * 5)
        if i % 2:
            with pytest.raises(MessageFailed, match=f"msg_id {m}: plugin 'odd' failed the message with code {m + 1}"):
                q.wait_result(m)
        else:
            assert q.wait_result(m) == bytes([i]) * 5
    s = q.stats()
    assert s.occupied == 0 and s.taken == s.enqueued == 43 and q._kernel.error == (0, 0)
    q.shutdown()  # no protocol error: a failure is a status, not a broken slot
    q.close()


def test_message_failed_is_distinct_from_bad_result(make_queue):
    """GPUQ_FAIL(code) (>= 0x80000000) is a status; a length above out_cap and below that is BAD_RESULT."""
    source = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)in; (void)out; (void)msg_id; (void)lane;
  if (len == 1u) return out_cap + 1u;     // BAD_RESULT
  if (len == 2u) return 0x7FFFFFFFu;      // BAD_RESULT: the largest non-failure value
  if (len == 3u) return 0x80000000u;      // GPUQ_FAIL(0): code 0
  if (len == 4u) return 0x8001002Au;      // a failure: code 0x2A (the low 16 bits)
  return 0u;
}
"""

    def twin(payload, msg_id):
        n = len(payload)
        if n in (3, 4):
            raise Fail(0 if n == 3 else 0x2A)
        return b"x" * 17 if n in (1, 2) else b""  # too long for the 16-byte slot: BAD_RESULT

    q = make_queue(capacity=8, slot_bytes=16, plugin=Plugin.from_source("edges", source, twin=twin))
    ids = [q.enqueue(b"a")]
    with pytest.raises(ProtocolError, match=f"msg_id {ids[0]}: device reported BAD_RESULT"):
        q.wait_result(ids[0])  # alone first: on the GPU it is then surely the first BAD_RESULT
    ids += [q.enqueue(b"a" * n) for n in (2, 3, 4, 5)]
    with pytest.raises(ProtocolError, match=f"msg_id {ids[1]}: device reported BAD_RESULT"):
        q.wait_result(ids[1])
    with pytest.raises(MessageFailed, match=f"msg_id {ids[2]}: plugin 'edges' failed the message with code 0$"):
        q.wait_result(ids[2])
    with pytest.raises(MessageFailed) as info:
        q.wait_result(ids[3])
    assert info.value.code == 0x2A and not isinstance(info.value, ProtocolError)
    assert q.wait_result(ids[4]) == b""
    with pytest.raises(ProtocolError, match=f"BAD_RESULT at msg_id {ids[0]}"):
        q.close()


def test_message_failed_pickles_and_is_a_gpuq_error():
    e = MessageFailed(7, 3, "score")
    back = pickle.loads(pickle.dumps(e))
    assert (back.msg_id, back.code, back.plugin, str(back)) == (7, 3, "score", str(e))
    assert isinstance(e, GpuqError) and not isinstance(e, ProtocolError)


# -- status through BatchProcessor (NumPy here; the CUDA path on the GPU) --------------------------


@pytest.mark.parametrize("proc_backend", ["numpy", "cuda"])
def test_batch_processor_raises_message_failed_after_the_batch(request, proc_backend):
    if proc_backend == "cuda":
        request.getfixturevalue("gpu")
    payloads = [bytes([i]) * (i % 7) for i in range(40)]
    expect_fail = {i: i % 1000 + 1 for i, p in enumerate(payloads) if p and p[0] & 1}
    with BatchProcessor(slot_bytes=16, max_batch=64, plugin=ODD, backend=proc_backend) as proc:
        with pytest.raises(MessageFailed) as info:
            proc.process(payloads)
        e = info.value
        first = min(expect_fail)
        assert (e.msg_id, e.code, e.plugin) == (first, expect_fail[first], "odd") and e.failures == expect_fail
        assert str(e) == (
            f"msg_id {first}: plugin 'odd' failed the message with code {expect_fail[first]} "
            f"({len(expect_fail) - 1} more of the batch failed too: see .failures)"
        )
        assert e.results == [None if i in expect_fail else p for i, p in enumerate(payloads)]
        lens, out, codes = proc.process_packed([len(p) for p in payloads], b"".join(payloads), fail_codes=True)
        assert lens.tolist() == [FAILED if i in expect_fail else len(p) for i, p in enumerate(payloads)]
        assert codes.dtype == np.int32 and codes.tolist() == [expect_fail.get(i, -1) for i in range(len(payloads))]
        assert bytes(out) == b"".join(p for i, p in enumerate(payloads) if i not in expect_fail)
        lens2, out2 = proc.process_packed([len(p) for p in payloads], b"".join(payloads))  # the old shape
        assert lens2.tolist() == lens.tolist() and bytes(out2) == bytes(out)
        assert proc.process([b"\x02", b""]) == [b"\x02", b""]  # a batch without failures returns
        over = proc.process_packed([17, 1], b"\x01" * 17 + b"\x01", fail_codes=True)  # oversized: not a failure
        assert over[0].tolist() == [FAILED, FAILED] and over[2].tolist() == [-1, 2]


# -- params reaching the plugin, on both backends ------------------------------------------------------


def test_params_reach_the_plugin_byte_for_byte(make_queue):
    params = np.random.default_rng(5).integers(0, 256, (1 << 24) + 3, dtype=np.uint8)  # 16 MiB + 3
    q = make_queue(capacity=64, slot_bytes=256, plugin=PEEK, params=params)
    raw = params.tobytes()
    offsets = [0, 1, 255, 4096, len(raw) - 256, len(raw) - 1, len(raw), len(raw) // 2 + 7]
    offsets += np.random.default_rng(6).integers(0, len(raw), 100).tolist()
    for off in offsets:
        got = q.wait_result(q.enqueue(int(off).to_bytes(8, "little")))
        assert got == raw[off : off + 256], off
    with pytest.raises(MessageFailed, match="code 8$"):
        q.wait_result(q.enqueue((len(raw) + 1).to_bytes(8, "little")))
    with pytest.raises(MessageFailed, match="code 9$"):
        q.wait_result(q.enqueue(b"short"))


def test_no_params_is_nullptr_and_zero_on_the_device(make_queue):
    q = make_queue(capacity=4, slot_bytes=16, plugin=PEEK)
    with pytest.raises(MessageFailed, match="code 7$"):  # 6 would mean a pointer without bytes or the reverse
        q.wait_result(q.enqueue(bytes(8)))


# -- score ---------------------------------------------------------------------------------------------


def score_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ W in float64, and the float32 rounding bound each score must meet: 2 k eps32 sum |x_i w_ij|."""
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = 2 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    return exact, bound + 1e-30


def test_score_is_a_builtin_with_its_twin():
    assert {"echo", "crc32c", "score"} <= set(available())
    score = resolve("score")
    assert score.twin is score_twin and score.twin_keywords == ("params", "out_cap")
    assert score.origin == "plugins/score.cuh"
    for name, code in (
        ("BAD_PAYLOAD", SCORE_BAD_PAYLOAD),
        ("BAD_PARAMS", SCORE_BAD_PARAMS),
        ("TOO_LARGE", SCORE_TOO_LARGE),
    ):
        assert f"#define GPUQ_SCORE_{name} {code}u" in SCORE


@pytest.mark.parametrize("k, n", [(1, 1), (3, 5), (16, 4), (32, 32), (33, 31), (100, 64), (512, 1)])
def test_score_twin_is_x_times_w_in_float32(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    x = rng.standard_normal(k).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = score_twin(memoryview(x.tobytes()), 0, memoryview(w.tobytes()), 4 * n)
    assert got == (x @ w).astype(np.float32).tobytes() and len(got) == 4 * n
    exact, bound = score_reference(x, w)
    assert (np.abs(np.frombuffer(got, np.float32) - exact) <= bound).all()


@pytest.mark.parametrize(
    "payload_bytes, params_bytes, out_cap, code",
    [
        (0, 64, 64, SCORE_BAD_PAYLOAD),
        (6, 64, 64, SCORE_BAD_PAYLOAD),  # not whole float32 values: checked before the params
        (8, 0, 64, SCORE_BAD_PARAMS),  # no params
        (12, 64, 64, SCORE_BAD_PARAMS),  # 64 bytes are not whole rows of 3 floats
        (4, 68, 64, SCORE_TOO_LARGE),  # 17 scores do not fit in 64 bytes
        (4, 64, 64, None),  # 16 do
        (8, 64, None, None),  # out_cap unknown (a direct call): no size check
    ],
)
def test_score_twin_failure_codes(payload_bytes, params_bytes, out_cap, code):
    payload, params = memoryview(bytes(payload_bytes)), memoryview(bytes(params_bytes))
    if code is None:
        assert score_twin(payload, 0, params, out_cap) == bytes(params_bytes // payload_bytes * 4)
    else:
        with pytest.raises(Fail) as info:
            score_twin(payload, 0, params, out_cap)
        assert info.value.code == code


def test_score_through_the_simulator_and_numpy_batch():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((24, 10)).astype(np.float32)
    xs = rng.standard_normal((50, 24)).astype(np.float32)
    expect = np.stack([x @ w for x in xs])  # as the twin computes it, one vector at a time
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=128, plugin="score", params=w, backend="sim")) as q:
        for x, e in zip(xs, expect):
            assert np.array_equal(np.frombuffer(q.wait_result(q.enqueue(x)), np.float32), e)
        with pytest.raises(MessageFailed, match="plugin 'score' failed the message with code 2$"):
            q.wait_result(q.enqueue(xs[0, :7]))  # 7 floats: W's 960 bytes are no whole rows of 7
        assert q.wait_result(q.enqueue(xs[1])) == expect[1].tobytes()
    with BatchProcessor(slot_bytes=128, max_batch=64, plugin="score", params=w, backend="numpy") as proc:
        assert proc.process(list(xs)) == [e.tobytes() for e in expect]
        assert "params=<960 bytes>" in repr(proc)
        with pytest.raises(MessageFailed) as info:
            proc.process([xs[0], xs[0, :7], xs[1, :3]])  # 3 floats: 80 scores, more than a slot holds
        assert info.value.failures == {1: SCORE_BAD_PARAMS, 2: SCORE_TOO_LARGE}
        assert info.value.results == [expect[0].tobytes(), None, None]


@pytest.mark.parametrize("source", ["gpuq_queue.cu", "gpuq_batch.cu"])
@pytest.mark.parametrize("plugin", ["score", PEEK, ODD], ids=["score", "peek", "odd"])
def test_plugins_using_params_and_fail_compile_to_cubin(cache, source, plugin):
    cubin = compiler.compile_cubin(source, CompileOptions(arch="sm_90", plugin=plugin))
    assert cubin[:4] == b"\x7fELF" and b"gpuq_params_g\0" in cubin  # the global the host sets, unmangled


# -- on the GPU only: score on 100,000 messages against NumPy ---------------------------------------------


@pytest.fixture(scope="module")
def score_messages():
    """100,000 random float32 vectors of k = 40 and a [40, 24] weight matrix; x @ W in float64 and
    the float32 rounding bound of each score."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    xs = rng.standard_normal((100_000, 40)).astype(np.float32)
    exact, bound = score_reference(xs, w)
    return w, xs, exact, bound


def check_scores(got: list[bytes], exact: np.ndarray, bound: np.ndarray) -> None:
    assert len(got) == len(exact)
    scores = np.frombuffer(b"".join(got), np.float32).reshape(exact.shape)
    bad = np.argwhere(np.abs(scores - exact) > bound)
    assert not len(bad), f"{len(bad)} scores off; first (message, output): {bad[0].tolist()}: " + (
        f"device {scores[tuple(bad[0])]}, exact {exact[tuple(bad[0])]}, bound {bound[tuple(bad[0])]}"
    )


def test_score_on_the_gpu_through_gpuqueue(gpu, score_messages):
    w, xs, exact, bound = score_messages
    got = []
    with GpuQueue(QueueConfig(capacity=4096, slot_bytes=160, plugin="score", params=w)) as q:
        for start in range(0, len(xs), 2048):
            ids = [q.enqueue(x) for x in xs[start : start + 2048]]
            got += [q.wait_result(m, timeout=10.0) for m in ids]
        with pytest.raises(MessageFailed, match="code 1$"):  # and the queue goes on
            q.wait_result(q.enqueue(b"abc"))
        assert q.wait_result(q.enqueue(xs[0])) == got[0]
    check_scores(got, exact, bound)


def test_score_on_the_gpu_through_batch_processor(gpu, score_messages):
    w, xs, exact, bound = score_messages
    got = []
    with BatchProcessor(slot_bytes=160, max_batch=4096, plugin="score", params=w, backend="cuda") as proc:
        for start in range(0, len(xs), 4096):
            got += proc.process(list(xs[start : start + 4096]))
        with pytest.raises(MessageFailed) as info:
            proc.process([xs[0], xs[0, :7], b"abc"])
        assert info.value.failures == {1: SCORE_BAD_PARAMS, 2: SCORE_BAD_PAYLOAD}
    check_scores(got, exact, bound)


def test_score_on_the_gpu_with_wide_and_long_matrices(gpu):
    """k and n across the warp's 32-wide tiles (partial tiles, one lane, many tiles), one queue each."""
    rng = np.random.default_rng(13)
    for k, n in [(1, 1), (31, 33), (64, 100), (300, 7), (5, 1000)]:
        w = rng.standard_normal((k, n)).astype(np.float32)
        xs = rng.standard_normal((64, k)).astype(np.float32)
        exact, bound = score_reference(xs, w)
        slot = -(-max(4 * k, 4 * n) // 16) * 16
        with GpuQueue(QueueConfig(capacity=64, slot_bytes=slot, plugin="score", params=w)) as q:
            got = [q.wait_result(q.enqueue(x), timeout=10.0) for x in xs]
        check_scores(got, exact, bound)
    with GpuQueue(QueueConfig(capacity=8, slot_bytes=64, plugin="score", params=np.ones((1, 17), np.float32))) as q:
        with pytest.raises(MessageFailed, match=f"code {SCORE_TOO_LARGE}$"):
            q.wait_result(q.enqueue(np.ones(1, np.float32)))
