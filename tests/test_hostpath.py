"""The compiled host path (gpuq_driver/hostpath.c): enqueue and try_dequeue_result's common case in C.

It must behave exactly as the Python methods, which it calls for every other case: the same
msg_ids, results, errors and messages in a script that walks through the cases (run on both
paths and compared, and checked against the expected values), the same bytes in the ring, the
same waits behind a lock another thread holds.  Where it cannot be built (no C compiler, no Python
headers) the queue runs its Python methods; these tests then skip with that reason, except those
of the fallback itself.  On the simulator, as everything here; on the GPU the whole suite runs on
the compiled path where it exists (tests/test_gpu.py and the rest).
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from gpuq_driver import GpuqError, GpuQueue, QueueClosed, QueueConfig, hostpath
from gpuq_driver.layout import CHECK_LOW, CHECK_SHIFT, slot_check
from gpuq_driver.plugins import Fail, Plugin


def odd_twin(payload, msg_id):
    if len(payload) and payload[0] & 1:
        raise Fail(msg_id % 1000 + 1)
    return payload


# Fails every message whose first byte is odd, with code msg_id % 1000 + 1; echoes the others.
ODD = Plugin.from_source(
    "odd_hostpath",
    """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)out_cap;
  if (len > 0u && (in[0] & 1u)) return GPUQ_FAIL(msg_id % 1000u + 1u);
  for (uint32_t i = lane; i < len; i += 32u) out[i] = in[i];
  return len;
}
""",
    twin=odd_twin,
)


def compiled_or_skip():
    why = hostpath.status()
    if why != "compiled":
        pytest.skip(f"the compiled host path cannot be built here ({why})")


@pytest.fixture(params=["python", "compiled"])
def path(request, monkeypatch):
    """GPUQ_HOST_PATH for the test's queues; "compiled" skips (with the reason) where it cannot be built."""
    monkeypatch.setenv("GPUQ_HOST_PATH", request.param)
    if request.param == "compiled":
        compiled_or_skip()
    return request.param


def settle(q, timeout=10.0):
    """Until the device has processed every message enqueued."""
    deadline = time.monotonic() + timeout
    while q.stats().processed < q.stats().enqueued:
        assert time.monotonic() < deadline, q.stats()
        time.sleep(0.001)


def script(q) -> list:
    """Every case of the two calls, in order; each outcome as ("ok", value) or (exception name,
    message)."""
    out = []

    def rec(fn):
        try:
            out.append(("ok", fn()))
        except Exception as exc:  # the outcome is what is compared
            out.append((type(exc).__name__, str(exc)))

    payloads = [b"", b"\x02", bytes(64), bytes(range(2, 67)), bytearray(b"\x04" * 10), memoryview(b"\x06" * 20)]
    payloads.append(np.full(30, 8, np.uint8))
    for p in payloads:
        rec(lambda p=p: q.enqueue(p))
    rec(lambda: q.enqueue(b"x" * 129))  # too large
    rec(lambda: q.enqueue(b"\x0a", timeout=0))  # a timeout given
    rec(lambda: q.enqueue(payload=b"\x0c"))  # by keyword
    rec(lambda: q.enqueue(b"\x01\x02"))  # failed by the plugin (msg_id 9)
    rec(lambda: q.enqueue(b"\x0e", "soon"))  # a bad timeout
    settle(q)
    rec(lambda: q.try_dequeue_result(1))  # out of order
    rec(lambda: q.try_dequeue_result(1))  # taken already
    rec(lambda: q.try_dequeue_result(0))  # in order: the tail passes 1 too
    rec(lambda: q.try_dequeue_result(np.int64(2)))
    rec(lambda: q.try_dequeue_result(True))
    rec(lambda: q.try_dequeue_result(-1))
    rec(lambda: q.try_dequeue_result(10**6))  # never issued
    rec(lambda: q.try_dequeue_result(2**70))
    for m in range(3, 10):
        rec(lambda m=m: q.try_dequeue_result(m))  # 9 raises MessageFailed
    rec(lambda: q.try_dequeue_result(10))  # not issued yet
    for _ in range(16):
        rec(lambda: q.enqueue(b"\x02"))  # fills the ring: msg_ids 10 .. 25
    settle(q)  # so that QueueFull's message (what msg_id 10 waits for) is the same on every run
    rec(lambda: q.enqueue(b"\x02", timeout=0))  # QueueFull
    rec(lambda: q.enqueue(b"\x02"))  # QueueFull after enqueue_timeout_s
    settle(q)
    for m in range(10, 26):
        rec(lambda m=m: q.try_dequeue_result(m))
    r = q.reserve(2)  # msg_ids 26, 27
    r.data[:, 0] = 2
    rec(lambda: q.enqueue(b"\x02"))  # this thread holds a reservation: GpuqError
    r.commit(lengths=[1, 1])
    rec(lambda: q.enqueue(b"\x02"))  # 28
    settle(q)
    for m in range(26, 29):
        rec(lambda m=m: q.try_dequeue_result(m))
    rec(lambda: q.stats().taken)
    q.shutdown()
    rec(lambda: q.enqueue(b"\x02"))  # shut down
    q.close()
    rec(lambda: q.enqueue(b"\x02"))  # closed
    rec(lambda: q.try_dequeue_result(28))
    return out


def test_both_paths_walk_the_cases_alike(monkeypatch):
    """The script on the Python methods and on the compiled ones gives the same outcomes, and
    those are the ones expected (so that the comparison cannot pass with both wrong)."""
    compiled_or_skip()
    runs = {}
    for path in ("python", "compiled"):
        monkeypatch.setenv("GPUQ_HOST_PATH", path)
        q = GpuQueue(QueueConfig(capacity=16, slot_bytes=128, plugin=ODD, backend="sim", enqueue_timeout_s=0.05))
        assert q.host_path == path
        runs[path] = script(q)
    assert runs["compiled"] == runs["python"]
    out = runs["compiled"]
    assert out[:7] == [("ok", m) for m in range(7)]
    assert out[7][0] == "PayloadError" and "129 bytes" in out[7][1]
    assert out[8:11] == [("ok", 7), ("ok", 8), ("ok", 9)]
    assert out[11][0] == "ConfigError" and "timeout" in out[11][1]
    assert out[12:16] == [("ok", b"\x02"), ("ok", None), ("ok", b""), ("ok", bytes(64))]
    assert out[16][0] == "TypeError" and out[17:20] == [("ok", None)] * 3
    expected = [bytes(range(2, 67)), b"\x04" * 10, b"\x06" * 20, b"\x08" * 30, b"\x0a", b"\x0c"]
    assert out[20:26] == [("ok", r) for r in expected]
    assert out[26][0] == "MessageFailed" and "code 10" in out[26][1]  # msg_id 9: code 9 % 1000 + 1
    assert out[27] == ("ok", None) and out[28:44] == [("ok", m) for m in range(10, 26)]
    assert out[44][0] == out[45][0] == "QueueFull" and "has its result waiting" in out[45][1]
    assert out[46:62] == [("ok", b"\x02")] * 16
    assert out[62][0] == "GpuqError" and "reservation" in out[62][1]
    assert out[63] == ("ok", 28) and out[64:67] == [("ok", b"\x02")] * 3 and out[67] == ("ok", 29)
    assert [kind for kind, _ in out[68:]] == ["QueueClosed"] * 3


def test_the_compiled_enqueue_writes_the_python_ones_bytes(monkeypatch):
    """Payload, header (len | READY, or the one read's check word) and msg_id in the ring, and the
    doorbell, as the Python method writes them."""
    compiled_or_skip()
    rings = {}
    for path in ("python", "compiled"):
        monkeypatch.setenv("GPUQ_HOST_PATH", path)
        with GpuQueue(QueueConfig(capacity=8, slot_bytes=128, one_read=True, backend="sim")) as q:
            assert q.host_path == path
            q._check_depth = 1 << 62  # every message of at most 64 bytes checked
            for p in (b"", b"abc", bytes(range(64)), bytes(range(100))):
                q.wait_result(q.enqueue(p), timeout=5)
            rings[path] = (bytes(q._req_hdr.cast("B")), bytes(q._req_data), q._doorbell[0])
            h32 = q._req_hdr32
            for s, p in enumerate((b"", b"abc", bytes(range(64)))):  # the check word: layout.slot_check's
                assert h32[4 * s + 1] >> CHECK_SHIFT == slot_check(p, s, len(p)), s
                assert h32[4 * s + 1] & 0xFF == 0xFF ^ CHECK_LOW and h32[4 * s] == len(p)
    assert rings["compiled"] == rings["python"]


def test_a_call_waits_for_the_lock_another_thread_holds(path):
    """enqueue while another thread holds the producer lock, and a take while one holds the
    consumer lock, wait until it is released (the compiled path sees the lock held and takes the
    Python method, which waits for it)."""
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=64, backend="sim")) as q:
        assert q.host_path == path
        m0 = q.enqueue(b"first")
        q.wait_result(m0, timeout=5)
        m1 = q.enqueue(b"second")
        settle(q)
        for lock, call in ((q._plock, lambda: q.enqueue(b"third")), (q._clock, lambda: q.try_dequeue_result(m1))):
            done = []
            lock.acquire()
            try:
                t = threading.Thread(target=lambda call=call, done=done: done.append(call()))
                t.start()
                time.sleep(0.2)
                assert done == []
            finally:
                lock.release()
            t.join(5)
            assert done in ([2], [b"second"])


def test_a_dropped_queue_is_collected_and_a_kept_compiled_call_says_closed(monkeypatch):
    """The compiled calls hold the queue by a weak reference: a queue nobody holds is collected
    (and closed) at once, though its compiled enqueue and take are kept, which then raise
    QueueClosed (a kept bound Python method keeps its queue alive instead)."""
    compiled_or_skip()
    monkeypatch.setenv("GPUQ_HOST_PATH", "compiled")
    q = GpuQueue(QueueConfig(capacity=16, slot_bytes=64, backend="sim"))
    assert q.host_path == "compiled"
    enqueue, take, ref = q.enqueue, q.try_dequeue_result, weakref.ref(q)
    assert take(enqueue(b"x")) in (None, b"x")
    del q
    assert ref() is None  # no cycle: collected as the last reference goes
    with pytest.raises(QueueClosed):
        enqueue(b"y")
    with pytest.raises(QueueClosed):
        take(0)


def test_where_it_cannot_be_built_the_queue_runs_its_python_methods(monkeypatch):
    """A failed build (or no compiler, or no headers) leaves the Python methods, and says why;
    GPUQ_HOST_PATH=compiled then refuses the queue with that reason; =python never binds it; an
    unknown value is refused by name."""
    monkeypatch.setattr(hostpath, "_state", {"module": None, "why": "no C compiler (cc)"})
    monkeypatch.setenv("GPUQ_HOST_PATH", "auto")
    with GpuQueue(QueueConfig(capacity=8, slot_bytes=64, backend="sim")) as q:
        assert q.host_path == "python" and q.enqueue.__func__ is GpuQueue.enqueue
        assert q.wait_result(q.enqueue(b"z"), timeout=5) == b"z"
    assert hostpath.status() == "python: no C compiler (cc)"
    monkeypatch.setenv("GPUQ_HOST_PATH", "compiled")
    with pytest.raises(GpuqError, match="cannot have it: python: no C compiler"):
        GpuQueue(QueueConfig(capacity=8, slot_bytes=64, backend="sim"))
    monkeypatch.setenv("GPUQ_HOST_PATH", "python")
    assert hostpath.module() is None and hostpath.status() == "python: GPUQ_HOST_PATH=python"
    monkeypatch.setenv("GPUQ_HOST_PATH", "fast")
    with pytest.raises(GpuqError, match="GPUQ_HOST_PATH='fast'"):
        hostpath.mode()


def test_a_subclass_keeps_the_python_methods(monkeypatch):
    """Only GpuQueue itself gets the compiled calls: a subclass keeps its overrides, and one that
    overrides nothing but ``__setattr__`` keeps the Python methods too (the compiled calls store
    ``_head`` and ``_tail`` as attributes: a Python ``__setattr__`` there let other threads in, and
    a new user's trial got duplicate msg_ids and results taken twice)."""
    monkeypatch.setenv("GPUQ_HOST_PATH", "auto")

    class Counting(GpuQueue):
        calls = 0

        def enqueue(self, payload, timeout=None):
            Counting.calls += 1
            return super().enqueue(payload, timeout)

    class Watching(GpuQueue):
        def __setattr__(self, name, value):
            time.sleep(0)  # lets another thread run, as logging in a __setattr__ would
            super().__setattr__(name, value)

    with Counting(QueueConfig(capacity=8, slot_bytes=64, backend="sim")) as q:
        assert q.host_path == "python"
        q.wait_result(q.enqueue(b"a"), timeout=5)
    assert Counting.calls == 1
    with Watching(QueueConfig(capacity=256, slot_bytes=64, backend="sim")) as q:
        assert q.host_path == "python"
        ids: list = []
        workers = [threading.Thread(target=lambda: ids.extend(q.enqueue(b"w") for _ in range(50))) for _ in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
        assert sorted(ids) == list(range(200))


def test_bad_calls_raise_what_the_python_methods_raise(monkeypatch):
    """Arguments the compiled calls do not take themselves (keywords, wrong counts, odd timeouts)
    go to the Python methods as given: the same results and the same errors, word for word."""
    compiled_or_skip()
    runs = {}
    for path in ("python", "compiled"):
        monkeypatch.setenv("GPUQ_HOST_PATH", path)
        out = []
        with GpuQueue(QueueConfig(capacity=16, slot_bytes=64, backend="sim")) as q:
            assert q.host_path == path
            calls = [
                lambda: q.enqueue(),
                lambda: q.enqueue(b"a", 1, 2),
                lambda: q.enqueue(b"a", bad=1),
                lambda: q.enqueue(payload=b"b", timeout=0.5),
                lambda: q.enqueue(b"c", 0),
                lambda: q.enqueue(b"d", timeout=1),
                lambda: q.enqueue(b"e", timeout=-1),
                lambda: q.enqueue(b"f", timeout=float("nan")),
                lambda: q.enqueue(b"g", timeout=True),
                lambda: q.wait_result(2, timeout=5),
                lambda: q.try_dequeue_result(),
                lambda: q.try_dequeue_result(0, 1),
                lambda: q.try_dequeue_result(msg_id=0),
                lambda: q.try_dequeue_result(msg=0),
            ]
            for call in calls:
                try:
                    out.append(("ok", call()))
                except Exception as exc:  # the outcome is what is compared
                    out.append((type(exc).__name__, str(exc)))
        runs[path] = out
    assert runs["compiled"] == runs["python"]
    out = runs["compiled"]
    assert [kind for kind, _ in out[:3]] == ["TypeError"] * 3
    assert out[3:6] == [("ok", 0), ("ok", 1), ("ok", 2)]
    assert [kind for kind, _ in out[6:9]] == ["ConfigError"] * 3
    assert out[9] == ("ok", b"d")
    assert [kind for kind, _ in out[10:12]] == ["TypeError"] * 2
    assert out[12] == ("ok", b"b") and out[13][0] == "TypeError"


def test_the_compiled_calls_have_a_signature(path):
    """inspect.signature works on both paths, with the Python methods' parameters."""
    import inspect

    with GpuQueue(QueueConfig(capacity=8, slot_bytes=64, backend="sim")) as q:
        assert list(inspect.signature(q.enqueue).parameters) == ["payload", "timeout"]
        assert list(inspect.signature(q.try_dequeue_result).parameters) == ["msg_id"]


def test_the_build_is_cached_and_reused(tmp_path, monkeypatch):
    """The module is compiled once into the cache (GPUQ_CACHE_DIR/<format>/host) and loaded from
    there after: no compiler run the second time."""
    compiled_or_skip()
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    real = hostpath.subprocess.run

    def spy(cmd, *a, **k):
        runs.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(hostpath.subprocess, "run", spy)
    mod, why = hostpath._build()
    assert mod is not None and why == ""
    built = list((tmp_path / "cache").rglob("_gpuq_hostpath-*.so"))
    assert len(built) == 1 and built[0].parent.name == "host" and hostpath._cached(built[0])
    assert sum("-shared" in cmd for cmd in runs) == 1
    mod2, _ = hostpath._build()
    assert mod2 is not None and sum("-shared" in cmd for cmd in runs) == 1


def test_a_truncated_cached_module_is_built_again_not_loaded(tmp_path):
    """A cached module cut short (a full disk, a killed copy) is found by its digest and built
    again; loading it killed the process with SIGBUS in a new user's trial.  In child processes,
    so that such a crash fails the test instead of ending the run."""
    compiled_or_skip()
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPUQ_CACHE_DIR": str(tmp_path / "cache"), "GPUQ_HOST_PATH": "compiled"}
    code = (
        "from gpuq_driver import GpuQueue, QueueConfig\n"
        "with GpuQueue(QueueConfig(capacity=8, slot_bytes=64, backend='sim')) as q:\n"
        "    print(q.host_path, q.wait_result(q.enqueue(b'ok'), timeout=5))\n"
    )
    for cut in (None, 1000, 0):
        if cut is not None:
            (built,) = (tmp_path / "cache").rglob("_gpuq_hostpath-*.so")
            built.write_bytes(built.read_bytes()[:cut])
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == ["compiled", "b'ok'"], (cut, r.returncode, r.stderr[-800:])
    (built,) = (tmp_path / "cache").rglob("_gpuq_hostpath-*.so")
    assert hostpath._cached(built)


def test_an_unwritable_cache_builds_for_the_process_alone(tmp_path, monkeypatch):
    """A cache folder that cannot be written (here: under a file) does not turn the compiled path
    off: it is built in a temporary folder for this process, as an unwritable CUBIN cache costs
    only a compile.  $CC may carry arguments (``ccache cc``, ``gcc -O0``), as in a Makefile."""
    compiled_or_skip()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setenv("CC", "cc -O0")
    mod, why = hostpath._build()
    assert mod is not None and why == "", why
    monkeypatch.setenv("CC", "cc -no-such-flag-anywhere")
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path / "cache2"))
    mod, why = hostpath._build()
    assert mod is None and "exit status" in why and "no-such-flag" in why


def test_free_threaded_cpython_keeps_the_python_methods(monkeypatch):
    """The compiled calls rely on the GIL to keep other threads out between their checks and their
    stores: on a free-threaded CPython they are not built."""
    real = hostpath.sysconfig.get_config_var
    monkeypatch.setattr(hostpath.sysconfig, "get_config_var", lambda n: 1 if n == "Py_GIL_DISABLED" else real(n))
    mod, why = hostpath._build()
    assert mod is None and "free-threaded" in why
