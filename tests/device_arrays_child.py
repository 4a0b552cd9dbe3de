"""Device arrays through a running queue on the GPU, in a child process (a hang is killed, not a stall):

    python tests/device_arrays_child.py LIB

LIB: "driver" (no CuPy or torch: a cuMemAlloc'd buffer behind a minimal __cuda_array_interface__,
the results read back with cuMemcpy), "cupy" or "torch" (their arrays in, through the CUDA array
interface and through DLPack; the results out to them both ways).  Every case runs against a queue
with ``result_memory="device"``, capacity 64 and batches of 48, so that the second batch wraps at
the ring's end.  "No host copy happened" is shown two ways: the host request ring (req_data) is
filled with a sentinel before the device enqueues and is unchanged after them (the payloads never
went through host memory), and the results' address is device memory (cuPointerGetAttribute).

Prints one JSON object per line: {"check": name, "ok": bool, ...} per check as it finishes (so the
last line before a hang names what was running), then {"done": true}.  Exit status 0 even when a
check fails (the parent asserts on the lines); 2 if LIB cannot be imported.
Used by tests/test_device_arrays.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gpuq_driver import GpuQueue, QueueConfig, driver  # noqa: E402

CAP, SB, N, SIZE = 64, 256, 48, 200
SENTINEL = 0xA5


def emit(**kw):
    print(json.dumps(kw), flush=True)


def check(name: str, ok, **kw):
    emit(check=name, ok=bool(ok), **kw)


class CudaArray:
    """The least a device array needs: a uint8 [n, size] buffer behind __cuda_array_interface__."""

    def __init__(self, ptr: int, n: int, size: int, pitch: int):
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": (n, size),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": (pitch, 1),
            "stream": None,
        }


class DLPackOnly:
    """Hides an array's CUDA array interface: only __dlpack__ / __dlpack_device__ remain."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def fill_sentinel(q):
    q._req_data[:] = bytes([SENTINEL]) * len(q._req_data)


def sentinel_intact(q) -> bool:
    return bytes(q._req_data) == bytes([SENTINEL]) * len(q._req_data)


def expected_rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (N, SIZE), dtype=np.uint8)


def host_copy_of(v) -> np.ndarray:
    """The view's rows copied to the host with the driver (the "driver" case's way to read them),
    into pinned memory allocated before the queue started, on a non-blocking stream."""
    rows, cols = v.data.shape
    driver.copy_dtoh_async(PINNED[0].host_ptr, v.data.ptr, rows * cols, q_stream[0])
    q_stream[0].synchronize()
    return np.frombuffer(PINNED[0].view, np.uint8)[: rows * cols].reshape(rows, cols).copy()


q_stream: list = []


def take_views(q, first: int, read) -> np.ndarray:
    """All N results from ``first`` through view_results_device (two views where the range wraps),
    each read by ``read(view)`` -> host uint8 rows; the views released."""
    rows, at = [], first
    while at < first + N:
        v = q.view_results_device(at, first + N - at, timeout=10.0)
        check("result pointer is device memory", driver.pointer_memory_type(v.data.ptr) == "device", at=at)
        check("view lengths", (v.lengths == SIZE).all(), at=at)
        rows.append(read(v)[:, :SIZE])
        v.release()
        at += len(v)
    return np.concatenate(rows)


def run_driver(q):
    ctx = driver.primary_context(0)
    stream = driver.Stream(ctx)
    q_stream.append(stream)
    for batch, seed in enumerate((1, 2)):
        want = expected_rows(seed)
        pitch = 256  # strided rows: 200 bytes each, 256 apart
        host = np.zeros((N, pitch), np.uint8)
        host[:, :SIZE] = want
        driver.copy_htod_async(BUF[0].ptr, host.ctypes.data, host.nbytes, stream)
        stream.synchronize()
        fill_sentinel(q)
        first = q.enqueue_device(CudaArray(BUF[0].ptr, N, SIZE, pitch))
        got = take_views(q, first, host_copy_of)
        check("driver: round trip", np.array_equal(got, want), batch=batch, first=first)
        check("driver: req_data untouched", sentinel_intact(q), batch=batch)
    # the host-copy calls in result_memory="device" mode
    want = expected_rows(3)
    host = np.ascontiguousarray(want)
    driver.copy_htod_async(BUF[0].ptr, host.ctypes.data, host.nbytes, stream)
    stream.synchronize()
    first = q.enqueue_device(CudaArray(BUF[0].ptr, N, SIZE, SIZE), lengths=np.full(N, 100))
    data, lens = q.take_results(first, N, timeout=10.0)
    check("driver: take_results from VRAM", np.array_equal(data[:, :100], want[:, :100]) and (lens == 100).all())
    first = q.enqueue_many(want[:4])
    check("driver: wait_result from VRAM", q.wait_result(first, timeout=10.0) == want[0].tobytes())
    _, data, lens = q.take_ready()
    deadline = time.monotonic() + 10.0
    while len(lens) < 3 and time.monotonic() < deadline:
        _, more, ml = q.take_ready()
        data, lens = np.concatenate([data, more]), np.concatenate([lens, ml])
    check("driver: take_ready from VRAM", np.array_equal(data[:3, :SIZE], want[1:4]))


def run_cupy(q):
    import cupy as cp

    s = cp.cuda.Stream(non_blocking=True)
    for batch, (via, seed) in enumerate((("cai", 1), ("dlpack", 2), ("cai", 3), ("dlpack", 4))):
        want = expected_rows(seed)
        with s:
            wide = cp.zeros((N, 256), cp.uint8)
            wide[:, :SIZE] = cp.asarray(want)  # made on stream s: enqueue_device orders after it
            x = wide[:, :SIZE]  # strided rows
        fill_sentinel(q)
        first = q.enqueue_device(x if via == "cai" else DLPackOnly(x), stream=s)
        untouched = sentinel_intact(q)

        def read(v, via=via):
            y = cp.asarray(v.data) if via == "cai" else cp.from_dlpack(v.data)
            check(f"cupy {via}: no copy out", y.data.ptr == v.data.ptr)
            return cp.asnumpy(y)

        got = take_views(q, first, read)
        check(f"cupy {via}: round trip", np.array_equal(got, want), batch=batch, first=first)
        check(f"cupy {via}: req_data untouched", untouched, batch=batch)
    # lifetime: an exported array holds the slots after release
    want = expected_rows(5)
    first = q.enqueue_device(cp.asarray(want))
    v = q.view_results_device(first, N, timeout=10.0)
    y = cp.from_dlpack(v.data)
    v.release()
    check("cupy: slots held while an export lives", not v.freed)
    ok = bool(cp.array_equal(y[:, :SIZE], cp.asarray(want)))
    del y
    check("cupy: values while held, freed once the export is gone", ok and v.freed)


def run_torch(q):
    import torch

    s = torch.cuda.Stream()
    for batch, (via, seed) in enumerate((("cai", 1), ("dlpack", 2), ("cai", 3), ("dlpack", 4))):
        want = expected_rows(seed)
        with torch.cuda.stream(s):
            wide = torch.zeros((N, 256), dtype=torch.uint8, device="cuda")
            wide[:, :SIZE] = torch.from_numpy(want).to("cuda", non_blocking=False)
            x = wide[:, :SIZE]
        fill_sentinel(q)
        first = q.enqueue_device(x if via == "cai" else DLPackOnly(x), stream=s)
        untouched = sentinel_intact(q)

        def read(v, via=via):
            y = torch.as_tensor(v.data, device="cuda") if via == "cai" else torch.from_dlpack(v.data)
            check(f"torch {via}: no copy out", y.data_ptr() == v.data.ptr and y.is_cuda)
            return y.cpu().numpy()

        got = take_views(q, first, read)
        check(f"torch {via}: round trip", np.array_equal(got, want), batch=batch, first=first)
        check(f"torch {via}: req_data untouched", untouched, batch=batch)
    want = expected_rows(5)
    first = q.enqueue_device(torch.from_numpy(want).cuda())
    v = q.view_results_device(first, N, timeout=10.0)
    y = torch.from_dlpack(v.data)
    v.release(stream=torch.cuda.current_stream())
    check("torch: slots held while an export lives", not v.freed)
    ok = bool(torch.equal(y[:, :SIZE].cpu(), torch.from_numpy(want)))
    del y
    check("torch: values while held, freed once the export is gone", ok and v.freed)


BUF: list = []
PINNED: list = []


def main() -> int:
    lib = sys.argv[1]
    if lib != "driver":
        try:
            __import__(lib)
        except ImportError as exc:
            emit(skip=f"{lib}: {exc}")
            return 2
    if lib == "torch":
        import torch

        torch.zeros(1, device="cuda")  # torch initialises CUDA before the queue exists
    ctx = driver.primary_context(0)
    BUF.append(driver.DeviceBuffer(ctx, N * 256))  # allocated before the persistent kernel runs
    PINNED.append(driver.MappedHostBuffer(ctx, CAP * SB))
    with GpuQueue(QueueConfig(capacity=CAP, slot_bytes=SB, result_memory="device")) as q:
        emit(started=True)
        {"driver": run_driver, "cupy": run_cupy, "torch": run_torch}[lib](q)
        check("stats: all taken", q.stats().occupied == 0, stats=str(q.stats()))
    emit(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
