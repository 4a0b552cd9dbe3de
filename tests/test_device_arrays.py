"""Device arrays in and out (gpuq_driver/device_arrays.py): ``QueueConfig(result_memory="device")``,
``view_results_device`` (CUDA array interface, DLPack) and ``enqueue_device``.

The simulator runs the same host code with host memory standing in for VRAM (numpy arrays in,
kDLCPU arrays out), so slot accounting, release order, the wrap at the ring's end, lengths, the
errors and the DLPack capsules' lifetimes are tested everywhere.  On the GPU each library runs in
a child process with a time bound (tests/device_arrays_child.py: CuPy's and torch's first calls
may wait behind a running kernel, and a hang must fail, not stall): round trips both ways through
the CUDA array interface and DLPack, values equal, the host request ring untouched (no host copy
in) and the results' address in device memory (no host copy out).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuq_driver import (
    ConfigError,
    GpuqError,
    GpuQueue,
    PayloadError,
    PayloadTypeError,
    QueueClosed,
    QueueConfig,
    QueueFull,
    device_arrays,
)
from gpuq_driver.device_arrays import DeviceArray, import_array

from .device_arrays_child import DLPackOnly  # the child's own (importing it runs nothing)

CHILD = Path(__file__).with_name("device_arrays_child.py")
CAP, SB = 8, 32


@pytest.fixture
def dq():
    """A simulated queue with its results in (stand-in) device memory."""
    q = GpuQueue(QueueConfig(backend="sim", capacity=CAP, slot_bytes=SB, result_memory="device"))
    yield q
    q.close()


def rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


def take_all(q, first: int, n: int) -> np.ndarray:
    out, at = [], first
    while at < first + n:
        with q.view_results_device(at, first + n - at) as v:
            out.append(np.asarray(v.data).copy())
            at += len(v)
    return np.concatenate(out)


# -- config ----------------------------------------------------------------------------------------


def test_result_memory_is_checked_and_host_by_default():
    assert QueueConfig().result_memory == "host"
    with pytest.raises(ConfigError, match="result_memory='vram' must be 'host' or 'device'"):
        QueueConfig(result_memory="vram")


def test_each_view_call_names_result_memory_when_refused(dq):
    dq.enqueue(b"x")
    with pytest.raises(ConfigError, match="result_memory='device'.*view_results_device"):
        dq.view_results(0, 1)
    with GpuQueue(QueueConfig(backend="sim", capacity=CAP, slot_bytes=SB)) as hq:
        hq.enqueue(b"x")
        with pytest.raises(ConfigError, match="needs QueueConfig\\(result_memory='device'\\)"):
            hq.view_results_device(0, 1)
        assert hq.wait_result(0) == b"x"


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("result_memory", ["host", "device"])
def test_host_calls_work_in_both_modes(result_memory):
    with GpuQueue(QueueConfig(backend="sim", capacity=CAP, slot_bytes=SB, result_memory=result_memory)) as q:
        a = rows(6, 20)
        first = q.enqueue_device(a)
        assert q.wait_result(first) == a[0].tobytes()
        data, lens = q.take_results(first + 1, 3)
        assert (lens == 20).all() and np.array_equal(data[:, :20], a[1:4])
        packed, lens = q.take_results(first + 4, 1, packed=True)
        assert packed.tobytes() == a[4].tobytes()
        start, data, lens = q.take_ready()
        while start + len(lens) < first + 6:
            start, data, lens = q.take_ready()
        assert np.array_equal(data[-1, :20], a[5])
        assert q.stats().occupied == 0


def test_round_trip_through_the_array_interface_and_dlpack(dq):
    a = rows(5, 24, seed=1)
    first = dq.enqueue_device(a)
    v = dq.view_results_device(first, 5)
    assert isinstance(v.data, DeviceArray) and v.data.__dlpack_device__() == (1, 0)  # kDLCPU on the simulator
    assert not hasattr(v.data, "__cuda_array_interface__")  # host memory: no CUDA array interface
    via_ai, via_dl = np.asarray(v.data), np.from_dlpack(v.data)
    assert via_ai.shape == via_dl.shape == (5, SB) and via_ai.dtype == np.uint8
    assert np.array_equal(via_ai[:, :24], a) and np.array_equal(via_dl[:, :24], a)
    assert via_ai.ctypes.data == via_dl.ctypes.data == v.data.ptr == dq._kernel.dmem.results + (first % CAP) * SB
    assert (v.lengths == 24).all() and list(v.msg_ids) == list(range(first, first + 5))
    del via_ai, via_dl
    v.release()
    assert v.freed and dq.stats().occupied == 0


def test_dlpack_in_through_our_own_capsule_and_its_deleter(dq):
    """A view's DeviceArray enqueued again through DLPack alone: the capsule is consumed (renamed)
    and its deleter called once the copy is done, so the first view's slots free."""
    a = rows(3, SB, seed=2)
    first = dq.enqueue_device(a)
    v = dq.view_results_device(first, 3)
    again = dq.enqueue_device(DLPackOnly(v.data))
    assert not device_arrays._exports  # the deleter ran: no export left
    v.release()
    assert v.freed
    assert np.array_equal(take_all(dq, again, 3), a)


def test_unconsumed_capsules_delete_their_export(dq):
    dq.enqueue_device(rows(2, 16))
    v = dq.view_results_device(0, 2)
    c1, c2 = v.data.__dlpack__(), v.data.__dlpack__(max_version=(1, 0))
    assert len(device_arrays._exports) == 2
    del c1, c2
    assert not device_arrays._exports
    v.release()
    assert v.freed


def test_dlpack_refuses_a_copy_or_a_move(dq):
    dq.enqueue_device(rows(1, 16))
    with dq.view_results_device(0, 1) as v:
        with pytest.raises(BufferError, match="never copied"):
            v.data.__dlpack__(copy=True)
        with pytest.raises(BufferError, match="never moved"):
            v.data.__dlpack__(dl_device=(2, 0))
        with pytest.raises(TypeError, match="stream must be an int or None"):
            v.data.__dlpack__(stream="s")


def test_strided_rows_and_lengths(dq):
    wide = rows(8, 64, seed=3)
    x = wide[::2, 5:25]  # rows 128 bytes apart, 20 bytes each
    first = dq.enqueue_device(x, lengths=[0, 7, 20, 3])
    with dq.view_results_device(first, 4) as v:
        assert list(v.lengths) == [0, 7, 20, 3]
        got = np.asarray(v.data)
        assert np.array_equal(got[1, :7], x[1, :7]) and np.array_equal(got[2, :20], x[2])
    # rows wider than slot_bytes are fine with lengths (only the first slot_bytes are copied)
    wider = rows(2, SB + 16, seed=4)
    first = dq.enqueue_device(wider, lengths=[SB, 1])
    data, lens = dq.take_results(first, 2)
    assert list(lens) == [SB, 1] and np.array_equal(data[0], wider[0, :SB]) and data[1, 0] == wider[1, 0]


def test_a_batch_wraps_at_the_ring_end_and_views_stop_there(dq):
    a, b = rows(5, 16, seed=5), rows(6, 16, seed=6)
    f1 = dq.enqueue_device(a)
    assert np.array_equal(take_all(dq, f1, 5)[:, :16], a)
    f2 = dq.enqueue_device(b)  # slots 5, 6, 7, then 0, 1, 2
    v = dq.view_results_device(f2, 6)
    assert len(v) == 3  # never past the ring's end
    w = dq.view_results_device(f2 + 3, 3)
    got = np.concatenate([np.asarray(v.data), np.asarray(w.data)])[:, :16]
    assert np.array_equal(got, b)
    v.release()
    w.release()
    assert dq.stats().occupied == 0


def test_the_kernel_reads_vram_slots_not_the_request_ring(dq):
    """GPUQ_REQ_IN_VRAM: the request ring (req_data) is never written, and the simulated kernel
    takes the payload from the VRAM slot (the sentinel there would be the result otherwise)."""
    dq._req_data[:] = b"\xa5" * len(dq._req_data)
    a = rows(CAP, 16, seed=7)
    first = dq.enqueue_device(a)
    assert bytes(dq._req_data) == b"\xa5" * len(dq._req_data)
    hdr = np.frombuffer(dq._req_hdr, np.uint64).reshape(CAP, 2)
    assert ((hdr[:, 0] >> np.uint64(32)) == (1 | 0x10)).all()  # READY | GPUQ_REQ_IN_VRAM
    assert np.array_equal(take_all(dq, first, CAP)[:, :16], a)
    # and a plain enqueue after it still reads the request ring
    assert dq.wait_result(dq.enqueue(b"plain")) == b"plain"


# -- slot accounting and release order --------------------------------------------------------------


def test_exports_hold_the_slots_after_release(dq):
    first = dq.enqueue_device(rows(CAP, 16))
    v = dq.view_results_device(first, CAP)
    exported = np.from_dlpack(v.data)  # numpy holds the capsule (its deleter) while it lives
    via_ai = np.asarray(v.data)  # holds the DeviceArray itself
    v.release()
    assert v.released and not v.freed and dq.free_slots() == 0
    with pytest.raises(GpuqError, match="released"):
        v.data  # noqa: B018
    with pytest.raises(QueueFull, match="held by arrays exported from a released view_results_device view"):
        dq.enqueue(b"x", timeout=0.01)
    del exported
    gc.collect()
    assert not v.freed and dq.free_slots() == 0
    del via_ai
    assert v.freed and dq.free_slots() == CAP
    assert dq.wait_result(dq.enqueue(b"after")) == b"after"


def test_views_free_in_msg_id_order(dq):
    first = dq.enqueue_device(rows(6, 16))
    v1 = dq.view_results_device(first, 2)
    v2 = dq.view_results_device(first + 2, 2)
    with pytest.raises(ConfigError, match="oldest result not taken or held"):
        dq.view_results_device(first + 5, 1)
    v2.release()
    assert v2.freed and dq.free_slots() == CAP - 6  # marked; freed with the view before it
    v1.release()
    assert dq.free_slots() == CAP - 2
    data, lens = dq.take_results(first + 4, 2)
    assert dq.free_slots() == CAP and dq.stats().occupied == 0


def test_a_dropped_view_warns_and_frees_once_its_exports_are_gone(dq):
    first = dq.enqueue_device(rows(3, 16))
    v = dq.view_results_device(first, 3)
    kept = np.from_dlpack(v.data)
    with pytest.warns(ResourceWarning, match="dropped unreleased"):
        del v
        gc.collect()
    assert dq.free_slots() == CAP - 3
    del kept
    assert dq.free_slots() == CAP


def test_release_waits_for_the_stream_given(dq, monkeypatch):
    waited = []
    monkeypatch.setattr(dq._kernel.dmem, "sync_stream", waited.append)
    dq.enqueue_device(rows(1, 16))
    v = dq.view_results_device(0, 1)
    v.release(stream=7)
    assert waited == [7] and v.freed


# -- errors: named, and nothing queued is lost -------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((2, 8), np.uint16), PayloadTypeError, "dtype uint8, not <u2"),
        (np.zeros(8, np.uint8), PayloadTypeError, "2-D \\[n, size\\].*1-D"),
        (np.zeros((2, SB + 1), np.uint8), PayloadError, f"{SB + 1} bytes; slot_bytes is {SB}"),
        (np.zeros((CAP + 1, 4), np.uint8), PayloadError, f"exceeds capacity={CAP}"),
        (np.zeros((2, 8), np.uint8)[:, ::2], PayloadTypeError, "contiguous \\(strides\\[1\\] == 1 byte\\)"),
        (np.zeros((4, 8), np.uint8)[::-1], PayloadTypeError, "row stride \\(strides\\[0\\]\\) is -8 bytes"),
        (b"bytes", PayloadTypeError, "host array on backend='sim'"),
        (object(), PayloadTypeError, "host array on backend='sim'"),
    ],
)
def test_bad_arrays_are_refused_and_nothing_queued_is_lost(dq, bad, error, match):
    kept = dq.enqueue_many(rows(2, 16, seed=8))
    with pytest.raises(error, match=match):
        dq.enqueue_device(bad)
    assert dq.stats().enqueued == 2
    data, _ = dq.take_results(kept, 2)
    assert np.array_equal(data[:, :16], rows(2, 16, seed=8))


def test_bad_lengths_stream_and_timeout_are_refused(dq):
    a = rows(3, 16)
    with pytest.raises(PayloadError, match="lengths has 2 entries"):
        dq.enqueue_device(a, lengths=[1, 2])
    with pytest.raises(PayloadError, match="message 1 is 17 bytes; the row is 16"):
        dq.enqueue_device(a, lengths=[1, 17, 2])
    with pytest.raises(ConfigError, match="stream must be an int stream handle"):
        dq.enqueue_device(a, stream="default")
    with pytest.raises(ConfigError, match="timeout"):
        dq.enqueue_device(a, timeout=-1)
    assert dq.enqueue_device(np.zeros((0, 16), np.uint8)) == 0 and dq.stats().enqueued == 0


def test_a_batch_that_does_not_fit_enqueues_nothing(dq):
    first = dq.enqueue_device(rows(6, 16))
    with pytest.raises(QueueFull, match="2 of 8 slots are free"):
        dq.enqueue_device(rows(3, 16), timeout=0.01)
    assert dq.stats().enqueued == 6
    assert take_all(dq, first, 6).shape == (6, SB)


class FakeCuda:
    """A CudaMemory stand-in for import_array's checks (no GPU needed)."""

    dl_device, in_stream = (2, 0), 99


def test_the_gpu_refuses_host_arrays_and_other_devices():
    with pytest.raises(PayloadTypeError, match="host memory \\(kDLCPU, ndarray\\).*enqueue_many takes host arrays"):
        import_array(np.zeros((2, 4), np.uint8), FakeCuda(), SB, None, None)
    with pytest.raises(PayloadTypeError, match="__cuda_array_interface__ or __dlpack__"):
        import_array(object(), FakeCuda(), SB, None, None)

    class OtherGpu:
        def __dlpack_device__(self):
            return (2, 1)

        def __dlpack__(self, **kw):
            raise AssertionError("not asked for a capsule")

    with pytest.raises(PayloadError, match="CUDA device 1; the queue runs on device 0"):
        import_array(OtherGpu(), FakeCuda(), SB, None, None)


def test_the_gpu_takes_the_stream_from_the_argument_or_the_array():
    class Cai:
        def __init__(self, stream):
            self.__cuda_array_interface__ = {
                "version": 3,
                "shape": (2, 4),
                "typestr": "|u1",
                "data": (0x1000, False),
                "strides": None,
                "stream": stream,
            }

    class TorchLike:
        cuda_stream = 1234

    assert import_array(Cai(None), FakeCuda(), SB, None, None).stream == 99  # the queue's own
    assert import_array(Cai(5), FakeCuda(), SB, None, None).stream == 5  # the producer's
    assert import_array(Cai(5), FakeCuda(), SB, None, TorchLike()).stream == 1234  # the caller's
    src = import_array(Cai(None), FakeCuda(), SB, None, 2)
    assert (src.ptr, src.n, src.size, src.pitch, src.stream) == (0x1000, 2, 4, 4, 2)


# -- on the GPU: CuPy, torch, and the driver alone, each in a child with a time bound ------------------


def run_child(lib: str, timeout: float = 240) -> list[dict]:
    try:
        r = subprocess.run([sys.executable, str(CHILD), lib], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        pytest.fail(f"{lib}: hung (killed after {timeout} s); last line: {lines[-1] if lines else 'none'}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode == 2 and lines and "skip" in lines[-1]:
        pytest.skip(lines[-1]["skip"])
    if r.returncode != 0:
        pytest.fail(f"{lib}: exit status {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return lines


@pytest.mark.parametrize("lib", ["driver", "cupy", "torch"])
def test_device_arrays_on_the_gpu(gpu, lib):
    if lib != "driver" and importlib.util.find_spec(lib) is None:
        pytest.skip(f"{lib} is not installed here (the H200 machine's python3 has it)")
    lines = run_child(lib)
    assert lines and lines[-1] == {"done": True}, lines[-5:]
    checks = [x for x in lines if "check" in x]
    failed = [x for x in checks if not x["ok"]]
    assert not failed, failed
    names = {x["check"] for x in checks}
    assert "result pointer is device memory" in names
    if lib == "driver":
        assert {"driver: round trip", "driver: req_data untouched", "driver: take_results from VRAM"} <= names
    else:
        for via in ("cai", "dlpack"):
            assert {
                f"{lib} {via}: round trip",
                f"{lib} {via}: req_data untouched",
                f"{lib} {via}: no copy out",
            } <= names
        assert f"{lib}: values while held, freed once the export is gone" in names


# -- defects found by a new user's trial -----------------------------------------------------------


class Raises:
    """A producer whose DLPack export fails (as numpy's does for a read-only array, torch's for a
    tensor that requires grad)."""

    def __init__(self, where: str):
        self.where = where

    def __dlpack__(self, **kw):
        if self.where == "dlpack":
            raise BufferError("cannot export this one")
        return np.zeros((2, 4), np.uint8).__dlpack__(**kw)

    def __dlpack_device__(self):
        if self.where == "device":
            raise RuntimeError("no device for you")
        return (1, 0)


class Interface:
    """An object with a hand-made (malformed) __array_interface__."""

    def __init__(self, iface):
        self.__array_interface__ = iface


@pytest.mark.parametrize(
    "bad, match",
    [
        (DLPackOnly(np.frombuffer(bytes(32), np.uint8).reshape(2, 16)), "__dlpack__\\(\\) failed: BufferError"),
        (Raises("dlpack"), "__dlpack__\\(\\) failed: BufferError: cannot export this one"),
        (Raises("device"), "__dlpack_device__\\(\\) failed: RuntimeError: no device for you"),
        (Interface({"shape": (2, 4), "typestr": "|u1", "version": 3}), "__array_interface__ is malformed"),
        (Interface({"shape": (2, 4), "typestr": "|u1", "data": None}), "__array_interface__ is malformed"),
        (Interface("not a dict"), "__array_interface__ is malformed"),
    ],
)
def test_a_producer_that_fails_or_lies_is_a_payload_type_error(dq, bad, match):
    kept = dq.enqueue_many(rows(2, 16, seed=9))
    with pytest.raises(PayloadTypeError, match=match):
        dq.enqueue_device(bad)
    assert dq.stats().enqueued == 2
    data, _ = dq.take_results(kept, 2)
    assert np.array_equal(data[:, :16], rows(2, 16, seed=9))


def test_queue_full_and_view_order_name_the_device_view_and_its_exports(dq):
    """A held device view is named by its own call; once released with an export alive, QueueFull
    says the exports hold the slots (release() would do nothing), not 'release() it'."""
    first = dq.enqueue_device(rows(CAP, 16))
    v = dq.view_results_device(first, 2)
    with pytest.raises(ConfigError, match="view_results_device must start at msg_id 2"):
        dq.view_results_device(first + 3, 1)
    rest = dq.view_results_device(first + 2, CAP - 2)
    rest.release()
    with pytest.raises(QueueFull, match=r"held by a result view \(view_results_device\): release\(\) it"):
        dq.enqueue(b"x", timeout=0)
    exported = np.asarray(v.data)
    v.release()
    for call in (lambda: dq.enqueue(b"x", timeout=0), lambda: dq.enqueue_device(rows(1, 16), timeout=0)):
        with pytest.raises(QueueFull, match="held by arrays exported from a released view_results_device view") as e:
            call()
        assert "release() it" not in str(e.value)
    del exported
    assert v.freed and dq.free_slots() == CAP


def test_a_device_array_refuses_new_exports_after_close():
    """After close() the (V)RAM behind a DeviceArray is freed: a new export of it would be a
    dangling pointer, so the array interface and __dlpack__ raise QueueClosed, as ``v.data`` does."""
    q = GpuQueue(QueueConfig(backend="sim", capacity=CAP, slot_bytes=SB, result_memory="device"))
    v = q.view_results_device(q.enqueue_device(rows(2, 16)), 2)
    d = v.data
    assert np.asarray(d).shape == (2, SB)  # while open: fine
    q.close()
    with pytest.raises(QueueClosed, match="queue is closed"):
        np.asarray(d)
    with pytest.raises(QueueClosed, match="queue is closed"):
        d.__dlpack__()
    with pytest.raises(QueueClosed, match="queue is closed"):
        v.data  # noqa: B018
    assert d.__dlpack_device__() == (1, 0) and "DeviceArray" in repr(d)


def test_a_negative_stream_handle_is_named_with_its_value(dq):
    """stream=-1 is an int: the error must not say 'not int'; it names the value and the limit."""
    with pytest.raises(ConfigError, match=r"stream=-1 is not a stream handle: an int >= 0") as e:
        dq.enqueue_device(rows(1, 4), stream=-1)
    assert "not int" not in str(e.value)
    with pytest.raises(ConfigError, match=r"stream must be an int stream handle .* not str"):
        dq.enqueue_device(rows(1, 4), stream="default")
    assert dq.stats().enqueued == 0


def test_stats_count_a_device_view_taken_once_its_exports_are_gone(dq):
    """QueueStats.taken counts a released view_results_device view only once it is freed (docs)."""
    v = dq.view_results_device(dq.enqueue_device(rows(2, 4)), 2)
    kept = np.asarray(v.data)
    v.release()
    assert not v.freed and dq.stats().taken == 0 and dq.stats().occupied == 2
    del kept
    assert v.freed and dq.stats().taken == 2 and dq.stats().occupied == 0
