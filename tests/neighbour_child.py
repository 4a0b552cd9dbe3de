"""Other CUDA work in the same process as a running queue: does each call come back, and how soon?

    python tests/neighbour_child.py LIB STATE [--lease-ms 1.0] [--sync-samples N]

LIB: "driver" (cuda-python: cuCtxSynchronize, cuMemAlloc + cuMemFree, a module load), "torch"
(a first matmul, synchronize, empty_cache, a loop of 4096x4096 matmuls, a kernel jiterator compiles
for the first time), "cupy" (asnumpy, a new ElementwiseKernel compiled for the first time, device
synchronize, freeing the memory pool).  torch initialises CUDA before the queue exists, CuPy after.
STATE: "idle" (the queue has served one message and waits), "busy" (a producer thread and a
consumer thread keep 64 B messages flowing, each result checked), or "none" (no queue at all: the
calls' own time, for comparison).
--rate: the producer's msg/s (default 200,000), in bursts with sleeps between,
as a real producer that does other work would; 0 = flat out, a thread that never lets go of the
GIL but for CPython's switch interval (5 ms), which then dominates how soon the main thread runs.
--sync-samples N: then N timed torch.cuda.synchronize() calls after a small op, 0-2 ms apart.

Prints one JSON object per line: {"call": name, "ms": wall time} per call as it returns (so the
last line before a hang names the call that hung), {"sync_ms": [...]} for the samples, and last
{"summary": ...}: messages sent / received / wrong / lost, msg/s while the calls ran, leases.
Used by tests/test_share_gpu.py (with a time bound: a hang fails) and benchmarks/bench_share.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpuq_driver import GpuQueue, QueueConfig, QueueFull  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def timed(name, fn):
    t = time.perf_counter()
    fn()
    emit(call=name, ms=(time.perf_counter() - t) * 1e3)


class Traffic:
    """A producer and a consumer thread: 64 B payloads, each result checked against its payload."""

    def __init__(self, q, rate: float):
        self.q, self.stop, self.rate = q, threading.Event(), rate
        self.base = q.stats().enqueued  # msg_id of this producer's first message
        self.pool = [os.urandom(64) for _ in range(251)]
        self.sent = self.received = self.wrong = 0
        self.produced = False
        self.threads = [threading.Thread(target=self.produce), threading.Thread(target=self.consume)]

    def start(self):
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()

    def produce(self):
        try:
            self._produce()
        finally:
            self.produced = True  # sent is final from here on

    def _produce(self):
        while not self.stop.is_set():
            if self.rate:  # paced: sleep (releasing the GIL) until the next message is due
                wait = self.t0 + self.sent / self.rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)  # ~60 µs at least: the messages due meanwhile go out as a burst
                    continue
            try:
                mid = self.q.enqueue(self.pool[(self.base + self.sent) % 251], timeout=0.1)
            except QueueFull:
                continue
            assert mid == self.base + self.sent
            self.sent += 1

    def consume(self):
        while not (self.produced and self.received == self.sent):
            ids = self.q.poll_completions()
            for mid in ids:
                self.wrong += self.q.try_dequeue_result(mid) != self.pool[mid % 251]
                self.received += 1
            if not ids:
                time.sleep(20e-6)

    def finish(self):
        elapsed = time.perf_counter() - self.t0
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return {
            "sent": self.sent,
            "received": self.received,
            "wrong": self.wrong,
            "lost": self.sent - self.received,
            "msg_per_s": self.received / elapsed,
            "threads_alive": sum(t.is_alive() for t in self.threads),
        }


def driver_calls():
    from cuda.bindings import driver as cu
    from cuda.bindings import nvrtc

    from gpuq_driver import driver
    from gpuq_driver.errors import check

    driver.primary_context(0)
    timed("cuCtxSynchronize", lambda: check(cu.cuCtxSynchronize(), "cuCtxSynchronize"))

    def alloc_free():
        ptr = check(cu.cuMemAlloc(64 << 20), "cuMemAlloc")
        check(cu.cuMemFree(ptr), "cuMemFree")

    timed("cuMemAlloc+cuMemFree", alloc_free)

    src = f'extern "C" __global__ void k(int* p) {{ p[0] = {random.randrange(1 << 30)}; }}'.encode()
    prog = check(nvrtc.nvrtcCreateProgram(src, b"k.cu", 0, [], []), "nvrtcCreateProgram")
    info = driver.device_info(0)
    check(nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture={info.arch}".encode()]), "nvrtcCompileProgram")
    cubin = b" " * check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")

    def load_run_unload():
        module = driver.Module(driver.primary_context(0), cubin)
        buf = driver.DeviceBuffer(module.ctx, 64)
        stream = driver.Stream(module.ctx)
        driver.launch(module.function("k"), 1, 32, [__import__("ctypes").c_uint64(buf.ptr)], stream)
        stream.synchronize()
        for r in (stream, buf, module):
            r.close()

    timed("module load+launch+unload", load_run_unload)


def torch_calls():
    import torch

    a = torch.randn(512, 512, device="cuda")
    timed("torch first 512x512 matmul", lambda: (a @ a).sum().item())
    timed("torch.cuda.synchronize", torch.cuda.synchronize)

    def empty_cache():
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        del x
        torch.cuda.empty_cache()

    timed("torch.cuda.empty_cache", empty_cache)

    def matmul_loop():
        x = torch.randn(4096, 4096, device="cuda")
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 1.0:
            y = x @ x
            n += 1
        torch.cuda.synchronize()
        emit(info="4096x4096 matmuls in 1 s", n=n, finite=bool(torch.isfinite(y).all()))

    timed("torch 4096x4096 matmul loop 1 s + sync", matmul_loop)

    def jiterator():
        from torch.cuda import jiterator

        c = random.randrange(1, 1000)
        fn = jiterator._create_jit_fn(f"template <typename T> T k{c}(T x) {{ return x * {c}; }}")
        out = fn(torch.ones(8, device="cuda"))
        assert float(out[0]) == c

    timed("torch jiterator kernel compiled for the first time", jiterator)


def cupy_calls():
    import cupy as cp

    timed("cp.asnumpy(cp.arange(1 << 20))", lambda: cp.asnumpy(cp.arange(1 << 20)))
    c = random.randrange(1, 1000)

    def new_kernel():
        k = cp.ElementwiseKernel("float32 x", "float32 y", f"y = x * {c}", f"gpuq_k{c}")
        assert float(k(cp.ones(10, cp.float32))[0]) == c

    timed("CuPy ElementwiseKernel compiled for the first time", new_kernel)
    timed("cp.cuda.Device().synchronize", cp.cuda.Device().synchronize)

    def free_pool():
        x = cp.empty(64 << 20, cp.uint8)
        del x
        cp.get_default_memory_pool().free_all_blocks()

    timed("CuPy free_all_blocks (cudaFree)", free_pool)


def sync_samples(n: int) -> list[float]:
    import torch

    x, out = torch.ones(1024, device="cuda"), []
    torch.cuda.synchronize()
    for _ in range(n):
        x.add_(1)
        t = time.perf_counter()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
        time.sleep(random.uniform(0, 2e-3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib", choices=["driver", "torch", "cupy"])
    ap.add_argument("state", choices=["idle", "busy", "none"])
    ap.add_argument("--lease-ms", type=float, default=QueueConfig.lease_ms)
    ap.add_argument("--sync-samples", type=int, default=0)
    ap.add_argument("--rate", type=float, default=200_000)
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (CPython's default is 5 ms)",
    )
    ap.add_argument(
        "--launch-rule",
        choices=["hand-over", "begun"],
        default="hand-over",
        help="when a producer queues the next lease (lease.Leases.second): during the hand-over "
        "(the default), or once the newest lease has begun (the rule before; for comparisons)",
    )
    ap.add_argument(
        "--launch",
        choices=["graph", "call", "graph-current"],
        default="graph",
        help="how a lease is launched: its graph, the context made current only where needed (the "
        "default), or as before the thirteenth session (cuCtxSetCurrent before each launch and each "
        "stream query, cuLaunchCooperativeKernel), or by its graph but with cuCtxSetCurrent before "
        "each stream query as before (for comparisons)",
    )
    args = ap.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.lib == "torch":  # torch first, the queue second; CuPy the other way round
        import torch

        torch.ones(1, device="cuda")
    q = None if args.state == "none" else GpuQueue(QueueConfig(capacity=4096, slot_bytes=64, lease_ms=args.lease_ms))
    if q is not None:
        q._leases.second = args.launch_rule == "hand-over"
        if args.launch != "graph":
            k = q._kernel
            if args.launch == "call":
                k.graph = None  # PersistentKernel.launch: cuCtxSetCurrent + cuLaunchCooperativeKernel
            done = k.stream.done

            def done_as_before(_done=done, _ctx=k.ctx):
                _ctx.make_current()
                return _done()

            k.stream.done = done_as_before
        assert q.wait_result(q.enqueue(b"warm"), timeout=10) == b"warm"
    traffic = Traffic(q, args.rate) if args.state == "busy" else None
    if traffic:
        traffic.start()
        time.sleep(0.2)
    {"driver": driver_calls, "torch": torch_calls, "cupy": cupy_calls}[args.lib]()
    if args.sync_samples:
        emit(sync_ms=sync_samples(args.sync_samples))
    summary = traffic.finish() if traffic else {}
    if q is not None:
        s = q.stats()
        q.close()
        summary.update(
            launches=s.launches,
            exits=s.exits,
            lease_ms=args.lease_ms,
            rate=args.rate,
            switch_interval_ms=sys.getswitchinterval() * 1e3,
        )
    emit(summary=summary)


if __name__ == "__main__":
    main()
