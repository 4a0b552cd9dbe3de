#!/usr/bin/env python3
"""Batch throughput of GpuQueue (issue 9): the batch calls end to end, beside plain copies and a
kernel launch per batch, from one Python thread; and asyncio over the queue.

Parts (--parts, comma-separated; all by default):
  e2e64      64 B messages end to end from one Python thread, every byte of every result checked
             against what was sent (each message stamped with its msg_id), up to --depth (4) batches of B in
             flight, for several B and two grids (threads_per_block 64 and 256), three ways:
             enqueue_many of a [B, 64] array -> take_results(out=) (copies both ways);
             enqueue_many -> view_results (compared in place, released);
             reserve/commit (whole messages written into the ring) -> view_results.
             The figure the issue asks for is msg/s (>= 50 M) at the best B.
  sweep      msg/s and GB/s of payload (each way) against message size (64 B .. 64 KB) and batch
             size, for two paths:
               copy     enqueue_many + take_results(out=), every byte compared;
               inplace  reserve(B) -> write each message's first 8 bytes (its msg_id) into the
                        request ring itself (the rest of each slot was filled once, the first time
                        round the ring) -> commit -> view_results -> compare the stamps of every
                        result and every byte of every 64th -> release (no copy in either direction;
                        the issue's "4 KB with reserve/commit and in-place results": >= 40 GB/s);
               inplace2t  inplace, with view_results -> check -> release in a second thread (the
                        producer's reserve/fill/commit and the consumer's checks overlap);
               inplace_full  the same, but the producer writes whole messages and every byte of
                        every result is compared (the host's memory bandwidth joins the figure);
             beside, for the same bytes: cuMemcpyHtoDAsync + cuMemcpyDtoHAsync + sync (the PCIe
             copy floor), BatchProcessor (this project's launch per batch: pack, H2D, launch, D2H,
             unpack) and a CuPy launch per batch (H2D from pinned memory, one echo kernel, D2H,
             sync; skipped with a note where CuPy is not installed).
  aio        asyncio (gpuq_driver.aio.AsyncQueue): 10,000 concurrent awaits, every result checked;
             64 B round trip one at a time through asyncio (await enqueue, await result) beside the
             blocking enqueue + wait_result, p50/p99; CPU time of the event loop thread and of the
             poller while idle.
  single     the per-message API as it is today (enqueue loop; enqueue + take interleaved), 64 B,
             to show the batch calls did not slow it down.
Writes <out>/bench_batch.json and <out>/bench_batch.png and prints tables.

    PYTHONPATH=. python benchmarks/bench_batch.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/bench_batch.py --backend sim --out /tmp/b   # the CPU simulator, small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plotting import pyplot  # noqa: E402  (benchmarks/plotting.py)

from gpuq_driver import GpuQueue, QueueConfig  # noqa: E402

MIB = 1 << 20
E2E_PATHS = {  # every byte of every result checked in each
    "copy": "enqueue_many + take_results(out=):",
    "view": "enqueue_many + view_results:",
    "inplace_full": "reserve/commit + view_results:",
    "device": "enqueue_device + view_results_device (CuPy):",
}


_RANDOM: dict = {}


def random_bytes(shape: tuple, seed: int) -> np.ndarray:
    """Random uint8 data of ``shape``, made once per (shape, seed) (rng.bytes: fast for 256 MiB)."""
    key = (shape, seed)
    if key in _RANDOM:
        _RANDOM[key] = _RANDOM.pop(key)  # the most recently used last
    if key not in _RANDOM:
        while len(_RANDOM) >= 2:  # a few at a time: they can be large (the ring's pattern, one batch's sources)
            del _RANDOM[next(iter(_RANDOM))]
        n = int(np.prod(shape))
        _RANDOM[key] = np.frombuffer(np.random.default_rng(seed).bytes(n), np.uint8).reshape(shape).copy()
    return _RANDOM[key]


def ring_capacity(size: int, ring_mib: int, max_cap: int) -> int:
    cap = 1
    while cap * 2 <= max_cap and cap * 2 * size <= ring_mib * MIB:
        cap *= 2
    return cap


def open_queue(backend: str, size: int, cap: int, tpb: int | None = None) -> GpuQueue:
    cfg = {"capacity": cap, "slot_bytes": max(16, (size + 15) & ~15), "backend": backend}
    if tpb is not None and backend == "cuda":
        cfg["threads_per_block"] = tpb
    return GpuQueue(QueueConfig(**cfg))


# --- the queue paths ---------------------------------------------------------------------------------


def run_copy(q: GpuQueue, size: int, batch: int, seconds: float, depth: int = 4, view: bool = False) -> dict:
    """enqueue_many + take_results(out=) (view=True: view_results, compared in place, released), B per
    call, up to ``depth`` batches in flight; every byte checked."""
    depth = max(1, min(depth, q.config.capacity // batch))
    block = random_bytes((depth, batch, size), size * 7919 + batch)
    srcs = [block[i] for i in range(depth)]
    out = np.empty((batch, q.config.slot_bytes), np.uint8)
    inflight: deque = deque()
    state = {"next": q.stats().enqueued, "bad": 0, "k": 0}
    stamp = size >= 8

    def send():
        src = srcs[state["k"] % depth]
        state["k"] += 1
        first = state["next"]
        if stamp:
            src[:, :8].view(np.uint64)[:, 0] = np.arange(first, first + batch, dtype=np.uint64)
        got = q.enqueue_many(src, timeout=30)
        assert got == first, f"enqueue_many returned {got}, expected {first}: another producer?"
        state["next"] = first + batch
        inflight.append((first, src))
        return batch

    def check(data, lens, src):
        if not ((lens == size).all() and np.array_equal(data[:, :size], src)):
            state["bad"] += int(((data[:, :size] != src).any(axis=1) | (lens != size)).sum())

    def recv():
        first, src = inflight.popleft()
        if view:  # a view never crosses the ring's end: the batch may come as two views
            done = 0
            while done < batch:
                with q.view_results(first + done, batch - done, timeout=30) as v:
                    check(v.data, v.lengths, src[done : done + len(v)])
                    done += len(v)
        else:
            check(*q.take_results(first, batch, timeout=30, out=out), src)

    def step():
        if len(inflight) == depth:
            recv()
        return send()

    return timed_loop(step, recv, inflight, batch, seconds, warmup=2 * depth) | {"mismatches": state["bad"]}


def run_device(q: GpuQueue, cp, size: int, batch: int, seconds: float, depth: int = 4) -> dict:
    """enqueue_device of CuPy arrays [B, size] (each message stamped with its msg_id on the GPU) ->
    view_results_device -> every byte compared on the GPU (cupy.array_equal) -> release, B per
    call; a queue with result_memory="device": no payload byte crosses PCIe, only the headers."""
    depth = max(1, min(depth, q.config.capacity // batch))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        srcs = [cp.asarray(random_bytes((batch, size), size * 31 + k)) for k in range(depth)]
        ids = cp.arange(batch, dtype=cp.uint64)
    inflight: deque = deque()
    state = {"next": q.stats().enqueued, "bad": 0, "k": 0}
    stamp = size >= 8

    def send():
        src = srcs[state["k"] % depth]
        state["k"] += 1
        first = state["next"]
        with stream:
            if stamp:
                src[:, :8].view(cp.uint64)[:, 0] = ids + cp.uint64(first)
            got = q.enqueue_device(src, stream=stream.ptr, timeout=30)
        assert got == first, f"enqueue_device returned {got}, expected {first}: another producer?"
        state["next"] = first + batch
        inflight.append((first, src))
        return batch

    def recv():
        first, src = inflight.popleft()
        done = 0
        while done < batch:  # a view never crosses the ring's end
            v = q.view_results_device(first + done, batch - done, timeout=30)
            k = len(v)
            with stream:
                got = cp.asarray(v.data)
                ok = bool(cp.array_equal(got[:, :size], src[done : done + k])) and bool((v.lengths == size).all())
            del got
            v.release(stream=stream.ptr)
            if not ok:
                state["bad"] += k
            done += k

    def step():
        if len(inflight) == depth:
            recv()
        return send()

    return timed_loop(step, recv, inflight, batch, seconds, warmup=2 * depth) | {"mismatches": state["bad"]}


def run_inplace(
    q: GpuQueue, size: int, batch: int, seconds: float, full: bool, depth: int = 4, consumer_thread: bool = False
) -> dict:
    """reserve -> fill in place -> commit -> view_results -> check -> release, B per call; all in this
    thread, or (consumer_thread) view_results -> check -> release in a second thread while this one
    reserves, fills and commits (numpy releases the GIL in its loops)."""
    cap, sb = q.config.capacity, q.config.slot_bytes
    depth = max(1, min(depth, cap // batch))
    pattern = random_bytes((cap, size), size)
    filled = np.zeros(cap, bool)
    inflight = _Handoff(depth) if consumer_thread else deque()
    state = {"bad": 0}
    stamp = size >= 8

    times: dict = {"send": [], "wait": [], "check": []}  # host seconds per batch call, by step
    clock = time.perf_counter

    def send():
        t0 = clock()
        r = q.reserve(batch, timeout=30)
        n, first = len(r), r.first
        slots = np.arange(first, first + n) & (cap - 1)
        rows = r.data
        if full or not filled[slots].all():  # whole messages (the first time round the ring, or full=True)
            rows[:, :size] = pattern[slots]
            filled[slots] = True
        if stamp:
            rows[:, :8].view(np.uint64)[:, 0] = np.arange(first, first + n, dtype=np.uint64)
        r.commit(size)
        times["send"].append(clock() - t0)
        inflight.append((first, n, slots))
        return n

    def recv(item=None):
        first, n, slots = inflight.popleft() if item is None else item
        t0 = clock()
        with q.view_results(first, n, timeout=30) as v:
            t1 = clock()
            assert len(v) == n
            data = v.data
            ok = (v.lengths == size).all()
            if stamp:
                ok = ok and np.array_equal(
                    data[:, :8].view(np.uint64)[:, 0], np.arange(first, first + n, dtype=np.uint64)
                )
            lo = 8 if stamp else 0
            step = 1 if full else 64
            ok = ok and np.array_equal(data[::step, lo:size], pattern[slots[::step], lo:size])
            if not ok:
                state["bad"] += n
        times["wait"].append(t1 - t0)
        times["check"].append(clock() - t1)

    def step():
        if len(inflight) == depth:
            recv()
        return send()

    done = 0  # one lap of the ring in large reservations: every slot gets its whole message once
    while done < cap:
        r = q.reserve(min(cap - done, 65536), timeout=30)
        slots = np.arange(r.first, r.first + len(r)) & (cap - 1)
        r.data[:, :size] = pattern[slots]
        r.commit(size)
        filled[slots] = True
        q.take_results(r.first, len(r), timeout=30, out=np.empty((len(r), sb), np.uint8))
        done += len(r)
    if consumer_thread:
        out = threaded_loop(send, recv, inflight, depth, seconds)
    else:
        out = timed_loop(step, recv, inflight, batch, seconds, warmup=2 * depth)
    out["mismatches"] = state["bad"]
    # median host time per batch in reserve..commit, waiting inside view_results, checking + release:
    # where the wait is ~0 the host is the limit
    return out | {f"host_{k}_ms": float(np.median(v)) * 1e3 for k, v in times.items() if v}


class _Handoff:
    """The producer's deque for threaded_loop: ``append`` blocks while ``depth`` batches wait."""

    def __init__(self, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)

    def append(self, item) -> None:
        self.q.put(item)


def threaded_loop(send, recv, hand: _Handoff, depth: int, seconds: float) -> dict:
    """send() in this thread (appending to ``hand``), recv(item) in a consumer thread, up to ``depth``
    batches between them; timed from after a warm-up until the consumer has checked the last batch.

    The first error of either side is raised here once the consumer has stopped: after an error the
    producer sends no more and the consumer passes the batches left over unchecked (a batch whose
    check failed may never be taken, so the producer may first wait out its reserve timeout)."""
    errors: list = []
    stop = threading.Event()

    def consume():
        while (item := hand.q.get()) is not None:
            try:
                if not stop.is_set():
                    recv(item)
            except BaseException as exc:  # noqa: BLE001 - reported by the producer
                errors.append(exc)
                stop.set()
            finally:
                hand.q.task_done()
        hand.q.task_done()

    consumer = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    consumer.start()

    def finish():
        hand.q.put(None)  # the consumer passes what is left (unchecked after an error), then ends
        consumer.join()

    count = 0
    try:
        for _ in range(2 * depth):
            if stop.is_set():
                break
            send()
        hand.q.join()
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end and not stop.is_set():
            count += send()
    except BaseException:
        stop.set()
        finish()
        if errors:  # the consumer's error came first (a QueueFull of this thread's, say, is its context)
            raise errors[0]  # noqa: B904
        raise
    finish()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"messages": count, "seconds": dt, "msg_per_s": count / dt, "consumer_thread": True}


def timed_loop(step, recv, inflight, batch: int, seconds: float, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    while inflight:
        recv()
    count = calls = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        count += step()  # messages sent (a reservation at the ring's end may be shorter than batch)
        calls += 1
        if calls % 8 == 0 and time.perf_counter() >= end:
            break
    while inflight:
        recv()
    dt = time.perf_counter() - t0
    return {"messages": count, "seconds": dt, "msg_per_s": count / dt}


# --- baselines -----------------------------------------------------------------------------------------


def memcpy_baseline(size: int, batch: int, seconds: float) -> dict:
    """cuMemcpyHtoDAsync + cuMemcpyDtoHAsync of batch x size bytes from/to pinned memory, then sync."""
    from gpuq_driver import driver

    ctx = driver.primary_context(0)
    nbytes = size * batch
    host = driver.MappedHostBuffer(ctx, 2 * nbytes)
    dev = driver.DeviceBuffer(ctx, nbytes)
    s = driver.Stream(ctx)
    np.frombuffer(host.view, np.uint8)[:nbytes] = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)

    def once():
        driver.copy_htod_async(dev.ptr, host.host_ptr, nbytes, s)
        driver.copy_dtoh_async(host.host_ptr + nbytes, dev.ptr, nbytes, s)
        s.synchronize()

    for _ in range(3):
        once()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        once()
        n += 1
    dt = time.perf_counter() - t0
    hv = np.frombuffer(host.view, np.uint8)
    ok = np.array_equal(hv[:nbytes], hv[nbytes : 2 * nbytes])
    del hv
    for r in (s, dev, host):
        r.close()
    return {"msg_per_s": n * batch / dt, "batches": n, "mismatches": 0 if ok else batch}


def batchprocessor_baseline(size: int, batch: int, seconds: float) -> dict:
    """gpuq_driver.BatchProcessor: one launch per batch (pack into pinned slots, H2D, launch, D2H, unpack)."""
    from gpuq_driver import BatchProcessor

    data = np.random.default_rng(2).integers(0, 256, size * batch, dtype=np.uint8).tobytes()
    lens = np.full(batch, size, np.uint32)
    with BatchProcessor(slot_bytes=max(16, (size + 15) & ~15), max_batch=batch, backend="cuda") as proc:
        out_lens, out = proc.process_packed(lens, data)
        bad = int((out_lens != size).sum()) + (0 if bytes(out) == data else 1)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            proc.process_packed(lens, data)
            n += 1
        dt = time.perf_counter() - t0
    return {"msg_per_s": n * batch / dt, "batches": n, "mismatches": bad}


_CUPY_ECHO = r"""
extern "C" __global__ void echo(const uint4* in, uint4* out, const unsigned* lin, unsigned* lout,
                                unsigned long long words, unsigned n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride)
    out[i] = in[i];
  for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += stride)
    lout[j] = lin[j];
}
"""


def cupy_baseline(size: int, batch: int, seconds: float) -> dict:
    """CuPy, one launch per batch: H2D of the batch (pinned), one echo kernel (payloads and lengths), D2H, sync."""
    import cupy as cp

    try:
        return _cupy_run(cp, size, batch, seconds)
    finally:  # nothing of CuPy's stays allocated beside the queues measured next
        cp.get_default_memory_pool().free_all_blocks()
        cp.get_default_pinned_memory_pool().free_all_blocks()


def _cupy_run(cp, size: int, batch: int, seconds: float) -> dict:
    import cupyx

    slot = max(16, (size + 15) & ~15)
    nbytes = slot * batch
    kernel = cp.RawKernel(_CUPY_ECHO, "echo")
    h_in = cupyx.empty_pinned((batch, slot), np.uint8)
    h_out = cupyx.empty_pinned((batch, slot), np.uint8)
    h_lin = cupyx.empty_pinned(batch, np.uint32)
    h_lout = cupyx.empty_pinned(batch, np.uint32)
    h_in[:] = np.random.default_rng(3).integers(0, 256, (batch, slot), dtype=np.uint8)
    h_lin[:] = size
    d_in, d_out = cp.empty((batch, slot), cp.uint8), cp.empty((batch, slot), cp.uint8)
    d_lin, d_lout = cp.empty(batch, cp.uint32), cp.empty(batch, cp.uint32)
    stream = cp.cuda.Stream(non_blocking=True)
    words = nbytes // 16
    grid = min(4096, max(1, -(-max(words, batch) // 256)))
    h2d, d2h = cp.cuda.runtime.memcpyHostToDevice, cp.cuda.runtime.memcpyDeviceToHost

    def once():
        cp.cuda.runtime.memcpyAsync(d_in.data.ptr, h_in.ctypes.data, nbytes, h2d, stream.ptr)
        cp.cuda.runtime.memcpyAsync(d_lin.data.ptr, h_lin.ctypes.data, 4 * batch, h2d, stream.ptr)
        with stream:  # RawKernel launches on the current stream
            kernel((grid,), (256,), (d_in, d_out, d_lin, d_lout, np.uint64(words), np.uint32(batch)))
        cp.cuda.runtime.memcpyAsync(h_out.ctypes.data, d_out.data.ptr, nbytes, d2h, stream.ptr)
        cp.cuda.runtime.memcpyAsync(h_lout.ctypes.data, d_lout.data.ptr, 4 * batch, d2h, stream.ptr)
        stream.synchronize()

    for _ in range(3):
        once()
    bad = int((h_lout != size).sum()) + int((h_out != h_in).any(axis=1).sum())
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        once()
        n += 1
    dt = time.perf_counter() - t0
    return {"msg_per_s": n * batch / dt, "batches": n, "mismatches": bad}


# --- asyncio ------------------------------------------------------------------------------------------


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def aio_part(backend: str, concurrent: int, rtt_iters: int) -> dict:
    from gpuq_driver.aio import AsyncQueue

    out: dict = {}
    with open_queue(backend, 64, 1 << max(10, (concurrent - 1).bit_length())) as q:

        async def main():
            async with AsyncQueue(q) as aq:

                async def one(i: int):
                    p = i.to_bytes(8, "little") * 8
                    return p == await aq.result(await aq.enqueue(p, timeout=60), timeout=60)

                t0 = time.perf_counter()
                oks = await asyncio.gather(*(one(i) for i in range(concurrent)))
                dt = time.perf_counter() - t0
                out["concurrent"] = {
                    "awaits": concurrent,
                    "seconds": dt,
                    "msg_per_s": concurrent / dt,
                    "wrong": oks.count(False),
                }
                payload = bytes(range(64))
                clock = time.perf_counter_ns
                lat = np.empty(rtt_iters, np.int64)
                for i in range(rtt_iters + 200):
                    t = clock()
                    r = await aq.result(await aq.enqueue(payload))
                    if i >= 200:
                        lat[i - 200] = clock() - t
                    assert r == payload
                out["rtt_asyncio"] = pct(lat)
                # idle: an iterator waiting, nothing outstanding
                it = asyncio.ensure_future(anext_or_none(aq))
                await asyncio.sleep(0.3)
                t_loop, t_poll, wall = time.thread_time(), thread_cpu(aq._thread), time.perf_counter()
                await asyncio.sleep(1.0)
                wall = time.perf_counter() - wall
                out["idle_cpu"] = {
                    "loop_thread": (time.thread_time() - t_loop) / wall,
                    "poller_with_an_iterator_waiting": (thread_cpu(aq._thread) - t_poll) / wall,
                }
                it.cancel()
                await asyncio.sleep(0.7)
                t_poll, wall = thread_cpu(aq._thread), time.perf_counter()
                await asyncio.sleep(1.0)
                out["idle_cpu"]["poller_nothing_awaited"] = (thread_cpu(aq._thread) - t_poll) / (
                    time.perf_counter() - wall
                )

        asyncio.run(main())
        payload = bytes(range(64))
        clock = time.perf_counter_ns
        lat = np.empty(rtt_iters, np.int64)
        for i in range(rtt_iters + 200):
            t = clock()
            r = q.wait_result(q.enqueue(payload), timeout=10)
            if i >= 200:
                lat[i - 200] = clock() - t
            assert r == payload
        out["rtt_blocking"] = pct(lat)
    return out


async def anext_or_none(aq):
    async for item in aq.completions():
        return item
    return None


def pct(samples_ns) -> dict:
    a = np.asarray(samples_ns, np.float64) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": int(a.size)}


# --- the per-message API ----------------------------------------------------------------------------------


def single_part(backend: str, n: int) -> dict:
    """The per-message figures of bench_latency.py (the same loops), on this run's backend."""
    from bench_latency import enqueue_throughput, sustained_one_thread

    e = enqueue_throughput(n, backend=backend)
    s = sustained_one_thread(n, backend=backend)
    return {
        "messages": n,
        "enqueue_msg_per_s": e["enqueue_msg_per_s"],
        "interleaved_msg_per_s": s["msg_per_s"],
        "mismatches": e["mismatches"] + s["mismatches"],
    }


# --- main -------------------------------------------------------------------------------------------------


def environment(backend: str) -> dict:
    env = {
        "backend": backend,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
    }
    if backend == "cuda":
        from importlib.metadata import version

        from gpuq_driver import driver
        from gpuq_driver.compiler import nvrtc_version

        info = driver.device_info(0)
        env.update(
            device=info.name,
            arch=info.arch,
            sm_count=info.sm_count,
            driver=int(driver.check(driver._driver().cuDriverGetVersion())),
            cuda_bindings=version("cuda-bindings"),
            nvrtc="{}.{}".format(*nvrtc_version()),
        )
    t_end = time.perf_counter() + (2.0 if backend == "cuda" else 0.2)  # let the host CPU's clock ramp up
    while time.perf_counter() < t_end:
        pass
    t0 = time.perf_counter()
    for _ in range(1_000_000):
        pass
    env["python_empty_loop_ns"] = round((time.perf_counter() - t0) * 1e3, 1)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description="GpuQueue batch throughput beside copies and launch per batch")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--backend", choices=("cuda", "sim"), default="cuda")
    ap.add_argument("--parts", default="e2e64,sweep,aio,single")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measured point")
    ap.add_argument("--sizes", default=None, help="message sizes in bytes, comma-separated")
    ap.add_argument("--batches", default=None, help="batch sizes, comma-separated")
    ap.add_argument("--tpb", default="64,256", help="threads_per_block of the e2e64 runs")
    ap.add_argument(
        "--inplace2t",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the sweep also runs inplace with a second thread taking the results (path inplace2t; default on)",
    )
    ap.add_argument(
        "--sweep-tpb", default="64", help="threads_per_block of the sweep's queues, comma-separated (one pass each)"
    )
    ap.add_argument("--ring-mib", type=int, default=256, help="request ring size per queue, MiB")
    ap.add_argument("--depth", type=int, default=4, help="batches in flight (the ring permitting)")
    args = ap.parse_args()
    sim = args.backend == "sim"
    seconds = args.seconds if args.seconds is not None else (0.2 if sim else 0.4)
    sizes = [int(x) for x in (args.sizes or ("64,1024" if sim else "64,256,1024,4096,16384,65536")).split(",")]
    batches = [int(x) for x in (args.batches or ("16,64" if sim else "16,64,256,1024,4096,16384,65536")).split(",")]
    parts = set(args.parts.split(","))
    max_cap = 1024 if sim else 1 << 20
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": environment(args.backend), "notes": []}
    print(f"environment: {results['env']}", flush=True)

    if "e2e64" in parts:
        rows = results["e2e64"] = []
        cp = None
        if not sim:
            try:
                import cupy as cp

                cp.array_equal(cp.zeros((2, 8), cp.uint8), cp.zeros((2, 8), cp.uint8))  # load its kernels first
                (cp.zeros(4, cp.uint64) + cp.uint64(1)).sum()
            except ImportError as exc:
                cp = None
                results["notes"].append(f"device arrays: skipped ({exc})")
        for tpb in [int(x) for x in args.tpb.split(",")] if not sim else [None]:
            e2e_batches = [b for b in (batches if sim else [1024, 4096, 16384, 65536])]
            with open_queue(args.backend, 64, max_cap, tpb) as q:
                st = q.stats()
                for b in e2e_batches:
                    if b * 2 > q.config.capacity:
                        continue
                    for path, label in E2E_PATHS.items():
                        t = 2 * seconds if not sim else seconds
                        if path == "device":
                            continue  # below, on a queue with its results in VRAM
                        if path == "inplace_full":
                            r = run_inplace(q, 64, b, t, full=True, depth=args.depth)
                        else:
                            r = run_copy(q, 64, b, t, depth=args.depth, view=path == "view")
                        r.update(path=path, size=64, batch=b, threads_per_block=st.threads_per_block, warps=st.warps)
                        rows.append(r)
                        print(
                            f"e2e 64 B, one thread, {label:38s} batch {b:6d}, {st.warps:4d} warps: "
                            f"{r['msg_per_s'] / 1e6:8.2f} M msg/s, mismatches {r['mismatches']}",
                            flush=True,
                        )

        if cp is not None:  # the device-array path: a queue whose results stay in VRAM
            for tpb in [int(x) for x in args.tpb.split(",")]:
                cfg = QueueConfig(capacity=max_cap, slot_bytes=64, threads_per_block=tpb, result_memory="device")
                with GpuQueue(cfg) as q:
                    st = q.stats()
                    for b in [4096, 16384, 65536]:
                        r = run_device(q, cp, 64, b, 2 * seconds, depth=args.depth)
                        r.update(path="device", size=64, batch=b, threads_per_block=tpb, warps=st.warps)
                        rows.append(r)
                        print(
                            f"e2e 64 B, one thread, {E2E_PATHS['device']:38s} batch {b:6d}, {st.warps:4d} warps: "
                            f"{r['msg_per_s'] / 1e6:8.2f} M msg/s, mismatches {r['mismatches']}",
                            flush=True,
                        )

    if "sweep" in parts:
        sweep = results["sweep"] = []
        sweep_tpbs = [int(x) for x in args.sweep_tpb.split(",")]
        if sim and len(sweep_tpbs) > 1:  # the simulator runs one warp whatever threads_per_block says
            sweep_tpbs = sweep_tpbs[:1]
            results["notes"].append("sweep: one pass, not one per --sweep-tpb value (the simulator runs one warp)")
        base = results["baselines"] = []
        for size in sizes:
            cap = ring_capacity(size, args.ring_mib if not sim else 1, max_cap)
            usable = [b for b in batches if b * 4 <= cap and b * size <= 64 * MIB]
            if not sim:  # baselines first: BatchProcessor and CuPy must not run beside a queue's kernel
                for b in usable:
                    for name, fn in (
                        ("memcpy", memcpy_baseline),
                        ("batchprocessor", batchprocessor_baseline),
                        ("cupy", cupy_baseline),
                    ):
                        try:
                            r = fn(size, b, seconds / 2)
                        except ImportError as exc:
                            note = f"{name}: skipped ({exc})"
                            if note not in results["notes"]:
                                results["notes"].append(note)
                                print(note, flush=True)
                            continue
                        r.update(path=name, size=size, batch=b, gb_per_s=r["msg_per_s"] * size / 1e9)
                        base.append(r)
            for tpb in sweep_tpbs:
                with open_queue(args.backend, size, cap, tpb) as q:
                    here = {"size": size, "threads_per_block": q.stats().threads_per_block}  # as run
                    for b in usable:
                        for mode in ("copy", "inplace", "inplace2t") if args.inplace2t else ("copy", "inplace"):
                            if mode == "copy":
                                r = run_copy(q, size, b, seconds, depth=args.depth)
                            else:
                                two = mode == "inplace2t"
                                r = run_inplace(q, size, b, seconds, full=False, depth=args.depth, consumer_thread=two)
                            r.update(here, path=mode, batch=b, gb_per_s=r["msg_per_s"] * size / 1e9)
                            sweep.append(r)
                    if usable:
                        best = max(
                            (r for r in sweep if r.items() >= here.items() and r["path"] == "inplace"),
                            key=lambda r: r["msg_per_s"],
                        )
                        r = run_inplace(q, size, best["batch"], seconds, full=True, depth=args.depth)
                        r.update(here, path="inplace_full", batch=best["batch"], gb_per_s=r["msg_per_s"] * size / 1e9)
                        sweep.append(r)
            for r in [x for x in sweep + base if x["size"] == size]:
                tpb = f" tpb {r['threads_per_block']:4d}" if "threads_per_block" in r else " " * 9
                print(
                    f"{r['path']:15s} {size:6d} B x {r['batch']:6d}{tpb}: {r['msg_per_s'] / 1e6:9.3f} M msg/s "
                    f"{r['gb_per_s']:7.2f} GB/s each way, mismatches {r['mismatches']}"
                    + (
                        f"; host per batch: send {r['host_send_ms']:.2f} ms, wait {r['host_wait_ms']:.2f} ms, "
                        f"check {r['host_check_ms']:.2f} ms"
                        if "host_send_ms" in r
                        else ""
                    ),
                    flush=True,
                )

    if "aio" in parts:
        results["aio"] = aio_part(args.backend, 1000 if sim else 10_000, 300 if sim else 5000)
        a = results["aio"]
        print(
            f"asyncio: {a['concurrent']['awaits']:,} concurrent awaits in {a['concurrent']['seconds']:.3f} s, "
            f"wrong {a['concurrent']['wrong']}; round trip 64 B p50/p99: asyncio {a['rtt_asyncio']['p50_us']:.1f}/"
            f"{a['rtt_asyncio']['p99_us']:.1f} us, blocking {a['rtt_blocking']['p50_us']:.1f}/"
            f"{a['rtt_blocking']['p99_us']:.1f} us; idle CPU: loop thread {a['idle_cpu']['loop_thread']:.2%}, "
            f"poller {a['idle_cpu']['poller_with_an_iterator_waiting']:.2%} (iterator waiting), "
            f"{a['idle_cpu']['poller_nothing_awaited']:.3%} (nothing awaited)",
            flush=True,
        )

    if "single" in parts:
        results["single"] = single_part(args.backend, 3000 if sim else 1_000_000)
        s = results["single"]
        print(
            f"per-message API, 64 B, one thread: enqueue {s['enqueue_msg_per_s']:,.0f} msg/s; enqueue + take "
            f"interleaved {s['interleaved_msg_per_s']:,.0f} msg/s; mismatches {s['mismatches']}",
            flush=True,
        )

    (out_dir / "bench_batch.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "bench_batch.png")
    summary(results)
    bad = sum(r.get("mismatches", 0) for key in ("e2e64", "sweep", "baselines") for r in results.get(key, []))
    bad += results.get("aio", {}).get("concurrent", {}).get("wrong", 0) + results.get("single", {}).get("mismatches", 0)
    return 1 if bad else 0


def summary(results: dict) -> None:
    e2e = results.get("e2e64", [])
    for path, label in E2E_PATHS.items():
        mine = [r for r in e2e if r["path"] == path]
        if mine:
            best = max(mine, key=lambda r: r["msg_per_s"])
            print(
                f"best 64 B end to end, one Python thread, {label} {best['msg_per_s'] / 1e6:.2f} M msg/s at "
                f"batch {best['batch']} ({best['warps']} warps), every byte checked; target 50 M"
            )
    for path, how in (("inplace", "one thread"), ("inplace2t", "results taken by a second thread")):
        four = [r for r in results.get("sweep", []) if r["size"] == 4096 and r["path"] == path]
        if four:
            best = max(four, key=lambda r: r["gb_per_s"])
            print(
                f"best 4 KB reserve/commit + in-place results ({how}): {best['gb_per_s']:.1f} GB/s each way at batch "
                f"{best['batch']} (threads_per_block {best.get('threads_per_block', 64)}), target 40"
            )
    for note in results.get("notes", []):
        print("note:", note)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None or not results.get("sweep"):
        return
    sweep, base = results["sweep"], results.get("baselines", [])
    rows = sweep + base
    paths = [
        p
        for p in ("copy", "inplace", "inplace2t", "inplace_full", "memcpy", "batchprocessor", "cupy")
        if any(r["path"] == p for r in rows)
    ]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for p in paths:
        pts = {}
        for r in rows:
            if r["path"] == p and r["gb_per_s"] > pts.get(r["size"], {"gb_per_s": -1})["gb_per_s"]:
                pts[r["size"]] = r
        xs = sorted(pts)
        axes[0].plot(xs, [pts[x]["gb_per_s"] for x in xs], marker="o", label=p)
        axes[1].plot(xs, [pts[x]["msg_per_s"] for x in xs], marker="o", label=p)
    for ax, label in ((axes[0], "GB/s of payload, each way (best batch)"), (axes[1], "messages/s (best batch)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size, bytes")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for size in sorted({r["size"] for r in sweep}):
        for p in ("copy", "inplace", "inplace2t"):
            per_batch: dict = {}  # the best grid at each batch size
            for r in sweep:
                if r["size"] == size and r["path"] == p:
                    per_batch[r["batch"]] = max(per_batch.get(r["batch"], 0.0), r["msg_per_s"])
            pts = sorted(per_batch.items())
            if len(pts) > 1:
                axes[2].plot([b for b, _ in pts], [m for _, m in pts], marker=".", label=f"{p} {size} B")
    for p in E2E_PATHS:  # 64 B end to end, every byte checked (best grid per batch)
        best: dict = {}
        for r in results.get("e2e64", []):
            if r["path"] == p and r["msg_per_s"] > best.get(r["batch"], 0):
                best[r["batch"]] = r["msg_per_s"]
        if best:
            xs = sorted(best)
            axes[2].plot(xs, [best[x] for x in xs], marker="s", linewidth=2, label=f"e2e 64 B {p}")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("batch size, messages per call")
    axes[2].set_ylabel("messages/s")
    axes[2].legend(fontsize=7, ncol=2)
    axes[2].grid(True, alpha=0.3)
    env = results["env"]
    fig.suptitle(f"gpuq_driver batch calls, one Python thread, {env.get('device', env['backend'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
