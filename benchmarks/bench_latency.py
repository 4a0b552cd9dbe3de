#!/usr/bin/env python3
"""Round-trip latency and enqueue throughput of GpuQueue, beside the launch-per-message baselines.

Everything is measured in one process, one run, on one GPU:
  floors      empty kernel launch + sync; 64 B H2D copy + sync; cuMemcpyHtoDAsync call alone;
              flag ping-pong through mapped pinned memory with a one-thread persistent kernel
  baselines   launch-per-message: (a) H2D copy, launch gpuq_batch, D2H copy, sync;
              (b) launch gpuq_batch reading and writing mapped pinned memory, sync
  queue       one message at a time, enqueue -> result bytes on the host (64 B, 512 B, 4 KB;
              and 64 B under several front_backoff_ns); per-message enqueue throughput from one
              Python thread (ring large enough for the burst, then the results are drained and
              checked); enqueue + take interleaved in one thread (sustained, ring of 1024)
  leases      the same queue figures with the default lease (1 ms) and with lease_ms=inf (the kernel
              never leaves: the behaviour before leases); the first message after the queue was
              idle for 5 ms and for 50 ms (within the default linger_ms: the kernel still serves),
              and after 5 ms with linger_ms=0 (the kernel has parked: enqueue launches a lease);
              pause()/resume()
Latencies are per-iteration perf_counter_ns deltas after a warm-up: p50 / p99 in µs.
Writes <out>/bench_latency.json and <out>/bench_latency.png and prints a table.

    PYTHONPATH=. python benchmarks/bench_latency.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plotting import pyplot  # noqa: E402  (benchmarks/plotting.py)

from gpuq_driver import GpuQueue, QueueConfig, compile_cubin, driver, hostpath  # noqa: E402
from gpuq_driver.compiler import CompileOptions, nvrtc_version  # noqa: E402


def pct(samples_ns) -> dict:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "n": int(a.size),
    }


def timed(fn, iters: int, warmup: int) -> dict:
    clock = time.perf_counter_ns
    for _ in range(warmup):
        fn()
    out = np.empty(iters, dtype=np.int64)
    for i in range(iters):
        t = clock()
        fn()
        out[i] = clock() - t
    return pct(out)


def floors_and_baselines(ctx, info, iters: int) -> tuple[dict, dict]:
    opts = CompileOptions(arch=info.arch)
    bench = driver.Module(ctx, compile_cubin("gpuq_bench.cu", opts))
    batch = driver.Module(ctx, compile_cubin("gpuq_batch.cu", opts))
    empty, pingpong, batch_fn = (
        bench.function("gpuq_empty"),
        bench.function("gpuq_pingpong"),
        batch.function("gpuq_batch"),
    )
    s = driver.Stream(ctx)
    pinned = driver.MappedHostBuffer(ctx, 1 << 16)
    dev = driver.DeviceBuffer(ctx, 1 << 16)
    res = {}

    res["empty_launch_sync"] = timed(lambda: (driver.launch(empty, 1, 32, [], s), s.synchronize()), iters, 500)
    res["h2d_64B_sync"] = timed(
        lambda: (driver.copy_htod_async(dev.ptr, pinned.host_ptr, 64, s), s.synchronize()), iters, 500
    )
    res["h2d_64B_async_call_only"] = timed(lambda: driver.copy_htod_async(dev.ptr, pinned.host_ptr, 64, s), iters, 500)
    s.synchronize()

    # launch-per-message baseline (a): copies.  Layout in pinned/dev: [0:64) payload, [4096:4100) len,
    # [8192:8256) result, [12288:12292) result len.
    payload = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()
    pv = pinned.view
    args_copy = [
        ctypes.c_uint64(dev.ptr),
        ctypes.c_uint64(dev.ptr + 4096),
        ctypes.c_uint64(dev.ptr + 8192),
        ctypes.c_uint64(dev.ptr + 12288),
        ctypes.c_uint32(1),
        ctypes.c_uint32(64),
        ctypes.c_uint64(0),
    ]

    def per_message_copies():
        pv[0:64] = payload
        pv[4096:4100] = (64).to_bytes(4, "little")
        driver.copy_htod_async(dev.ptr, pinned.host_ptr, 64, s)
        driver.copy_htod_async(dev.ptr + 4096, pinned.host_ptr + 4096, 4, s)
        driver.launch(batch_fn, 1, 32, args_copy, s)
        driver.copy_dtoh_async(pinned.host_ptr + 8192, dev.ptr + 8192, 64, s)
        driver.copy_dtoh_async(pinned.host_ptr + 12288, dev.ptr + 12288, 4, s)
        s.synchronize()

    res["launch_per_message_copies_64B"] = timed(per_message_copies, iters, 500)
    assert bytes(pv[8192:8256]) == payload, "launch-per-message baseline returned wrong bytes"

    # (b): the kernel reads and writes mapped pinned memory directly: launch + sync only.
    base = pinned.device_ptr
    args_mapped = [
        ctypes.c_uint64(base),
        ctypes.c_uint64(base + 4096),
        ctypes.c_uint64(base + 8192),
        ctypes.c_uint64(base + 12288),
        ctypes.c_uint32(1),
        ctypes.c_uint32(64),
        ctypes.c_uint64(0),
    ]
    pv[8192:8256] = bytes(64)

    def per_message_mapped():
        pv[0:64] = payload
        driver.launch(batch_fn, 1, 32, args_mapped, s)
        s.synchronize()

    res["launch_per_message_mapped_64B"] = timed(per_message_mapped, iters, 500)
    assert bytes(pv[8192:8256]) == payload

    # flag ping-pong floor
    flags = pv[32768 : 32768 + 16].cast("Q")
    flags[0] = flags[1] = 0
    driver.launch(pingpong, 1, 32, [ctypes.c_uint64(base + 32768), ctypes.c_uint64(base + 32776)], s)
    counter = [0]

    def ping():
        counter[0] += 1
        v = counter[0]
        flags[0] = v
        while flags[1] != v:
            pass

    res["flag_pingpong_mapped"] = timed(ping, iters, 1000)
    flags[0] = 0xFFFFFFFFFFFFFFFF
    s.synchronize()

    # the same with the queue's steps, one at a time: +64 B read, +64 B write and release
    pingpong_ex = bench.function("gpuq_pingpong_ex")
    for mode, name in (
        (0, "pingpong_warp"),
        (1, "pingpong_warp_read64"),
        (2, "pingpong_warp_write64"),
        (3, "pingpong_warp_read64_write64"),
    ):
        flags[0] = flags[1] = 0
        counter[0] = 0
        driver.launch(
            pingpong_ex,
            1,
            32,
            [
                ctypes.c_uint64(base + 32768),
                ctypes.c_uint64(base + 32776),
                ctypes.c_uint64(base + 40960),
                ctypes.c_uint64(base + 49152),
                ctypes.c_uint32(mode),
            ],
            s,
        )
        res[name] = timed(ping, iters // 2, 1000)
        flags[0] = 0xFFFFFFFFFFFFFFFF
        s.synchronize()

    res_store = store_costs(ctx, pingpong, s)
    for r in (pinned, dev, s, bench, batch):
        r.close()
    return res, res_store


def store_costs(ctx, pingpong, s) -> dict:
    """ns per enqueue-like store pattern (64 B payload, two header words, doorbell) into: a plain
    bytearray; idle mapped pinned memory; mapped pinned memory whose doorbell line a GPU thread
    polls (the gpuq_pingpong kernel).  Separates CPU cost from cache-coherence cost."""
    buf = driver.MappedHostBuffer(ctx, 1 << 23)
    out = {}
    payload = bytes(64)

    def run(mv, n=400_000):
        hdr, data, db = (
            mv[0 : 1 << 16].cast("Q"),
            mv[1 << 16 : (1 << 16) + (1 << 22)],
            mv[1 << 22 : (1 << 22) + 8].cast("Q"),
        )
        t0 = time.perf_counter()
        for i in range(n):
            slot = i & 4095
            off = slot << 6
            data[off : off + 64] = payload
            hdr[slot << 1] = 64
            hdr[(slot << 1) | 1] = i
            db[0] = i + 1
        return (time.perf_counter() - t0) / n * 1e9

    out["plain_bytearray_ns"] = run(memoryview(bytearray(1 << 23)))
    out["pinned_idle_ns"] = run(buf.view)
    pong = driver.MappedHostBuffer(ctx, 4096)
    buf.view[1 << 22 : (1 << 22) + 8].cast("Q")[0] = 0
    driver.launch(pingpong, 1, 32, [ctypes.c_uint64(buf.device_ptr + (1 << 22)), ctypes.c_uint64(pong.device_ptr)], s)
    time.sleep(0.01)
    out["pinned_gpu_polling_ns"] = run(buf.view)
    buf.view[1 << 22 : (1 << 22) + 8].cast("Q")[0] = 0xFFFFFFFFFFFFFFFF
    s.synchronize()
    buf.close()
    pong.close()
    print(f"  store pattern: {out}", flush=True)
    return out


def round_trip_samples(size: int, iters: int, warmup: int = 1000, **cfg) -> tuple:
    """One message at a time: enqueue, spin until the result is readable (its header's msg_id
    word), then take it.  Returns (enqueue -> readable ns, enqueue -> taken ns, wrong results,
    the queue's stats) after ``warmup`` messages."""
    slot = max(64, size)
    payloads = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes() for i in range(16)]
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=slot, **cfg)) as q:
        enqueue, take = q.enqueue, q.try_dequeue_result
        res_ids, mask = q._res_hdr, q._mask  # the result header's msg_id words (see layout.py)
        bad = 0
        clock = time.perf_counter_ns
        readable = np.empty(iters, dtype=np.int64)
        taken = np.empty(iters, dtype=np.int64)
        for i in range(iters + warmup):
            p = payloads[i & 15]
            t = clock()
            mid = enqueue(p)
            idx = ((mid & mask) << 1) | 1
            while res_ids[idx] != mid:
                pass
            t1 = clock()
            r = take(mid)
            t2 = clock()
            bad += r != p
            if i >= warmup:
                readable[i - warmup] = t1 - t
                taken[i - warmup] = t2 - t
        q.shutdown()  # the lease ends: the device's one-read counters are exact
        stats = q.stats()
    return readable, taken, int(bad), stats


def summarise(size: int, readable, taken, bad: int, stats: list, cfg: dict) -> dict:
    out = pct(readable)
    tk = pct(taken)
    out.update(cfg)
    out.update(
        taken_p50_us=tk["p50_us"],
        taken_p99_us=tk["p99_us"],
        mismatches=int(bad),
        spec_reads=sum(st.spec_reads for st in stats),
        spec_retries=sum(st.spec_retries for st in stats),
        blocks=stats[0].blocks,
        threads_per_block=stats[0].threads_per_block,
    )
    print(
        f"  round trip {size} B {cfg}: readable p50 {out['p50_us']:.2f} us, p99 {out['p99_us']:.2f} us; "
        f"taken p50 {tk['p50_us']:.2f} us, p99 {tk['p99_us']:.2f} us; served from the one read "
        f"{out['spec_reads']}, read again {out['spec_retries']}",
        flush=True,
    )
    return out


def queue_round_trip(size: int, iters: int, **cfg) -> dict:
    """p50/p99 of enqueue -> readable and of enqueue -> taken, one queue (round_trip_samples)."""
    readable, taken, bad, stats = round_trip_samples(size, iters, **cfg)
    return summarise(size, readable, taken, bad, [stats], cfg)


def round_trips_interleaved(size: int, iters: int, cfgs: dict, blocks: int = 4, warmup: int = 300) -> dict:
    """``queue_round_trip`` for each of ``cfgs`` (name -> QueueConfig fields), ``iters`` each, taken
    in ``blocks`` rounds that visit every configuration in turn, so that the host's drift (its
    clock and load change over a run by up to ~1.5 us on the H200 hosts) falls on all alike."""
    acc = {name: ([], [], 0, []) for name in cfgs}
    for _ in range(blocks):
        for name, cfg in cfgs.items():
            r, t, bad, st = round_trip_samples(size, max(1, iters // blocks), warmup=warmup, **cfg)
            rs, ts, b0, sts = acc[name]
            rs.append(r)
            ts.append(t)
            sts.append(st)
            acc[name] = (rs, ts, b0 + bad, sts)
    return {
        name: summarise(
            size, np.concatenate(rs), np.concatenate(ts), bad, sts, {**cfgs[name], "blocks_of_runs": blocks}
        )
        for name, (rs, ts, bad, sts) in acc.items()
    }


def after_idle(iters: int, idle_s: float, **cfg) -> dict:
    """The first message after the queue sat idle for ``idle_s``: enqueue (which launches a lease
    if the kernel has parked) -> result readable, and the enqueue call alone."""
    payload = bytes(range(64))
    with GpuQueue(QueueConfig(capacity=64, slot_bytes=64, **cfg)) as q:
        res_ids, mask, clock = q._res_hdr, q._mask, time.perf_counter_ns
        readable, enq = np.empty(iters, np.int64), np.empty(iters, np.int64)
        parked = 0
        for i in range(iters):
            time.sleep(idle_s)
            parked += q.stats().kernel == "parked"
            t = clock()
            mid = q.enqueue(payload)
            t1 = clock()
            idx = ((mid & mask) << 1) | 1
            while res_ids[idx] != mid:
                pass
            readable[i], enq[i] = clock() - t, t1 - t
            assert q.try_dequeue_result(mid) == payload
        s = q.stats()
    out = pct(readable)
    e = pct(enq)
    out.update(
        cfg,
        enqueue_p50_us=e["p50_us"],
        enqueue_p99_us=e["p99_us"],
        parked_before=parked,
        launches=s.launches,
        idle_s=idle_s,
    )
    print(
        f"  first message after {idle_s * 1e3:.0f} ms idle {cfg}: readable p50 {out['p50_us']:.2f} us, p99 "
        f"{out['p99_us']:.2f} us; enqueue call p50 {e['p50_us']:.2f} us; parked before {parked}/{iters}",
        flush=True,
    )
    return out


def pause_resume(iters: int) -> dict:
    """pause() (waits until no lease runs or is queued) and resume(), on a queue with traffic just before."""
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=64)) as q:
        clock = time.perf_counter_ns
        p, r = np.empty(iters, np.int64), np.empty(iters, np.int64)
        for i in range(iters):
            for mid in [q.enqueue(b"x" * 64) for _ in range(64)]:
                q.wait_result(mid)
            t = clock()
            q.pause()
            t1 = clock()
            q.resume()
            p[i], r[i] = t1 - t, clock() - t1
    pp, rr = pct(p), pct(r)
    print(
        f"  pause(): p50 {pp['p50_us']:.1f} us, p99 {pp['p99_us']:.1f} us; resume(): p50 {rr['p50_us']:.1f} us",
        flush=True,
    )
    return {"pause": pp, "resume": rr}


def enqueue_throughput(n: int, capacity: int | None = None, **cfg) -> dict:
    """One thread enqueues ``n`` messages of 64 B into an empty ring of ``capacity`` slots (default:
    the power of two >= n), then takes and checks them all."""
    cap = capacity or 1 << max(10, (n - 1).bit_length())
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(1024)]
    with GpuQueue(QueueConfig(capacity=cap, slot_bytes=64, **cfg)) as q:
        enqueue = q.enqueue
        for p in payloads:  # warm-up, then free the slots
            q.wait_result(enqueue(p))
        t0 = time.perf_counter()
        for i in range(n):
            enqueue(payloads[i & 1023])
        t_enq = time.perf_counter() - t0
        t0 = time.perf_counter()
        bad = 0
        first = 1024
        take = q.try_dequeue_result
        for mid in range(first, first + n):
            r = take(mid)
            while r is None:
                r = take(mid)
            bad += r != payloads[(mid - first) & 1023]
        t_take = time.perf_counter() - t0
        s = q.stats()
    return {
        "messages": n,
        "capacity": cap,
        "enqueue_msg_per_s": n / t_enq,
        "enqueue_ns_per_msg": t_enq / n * 1e9,
        "take_msg_per_s": n / t_take,
        "mismatches": int(bad),
        "processed": s.processed,
        "launches": s.launches,
        **cfg,
    }


def enqueue_throughput_interleaved(n: int, cfgs: dict, rounds: int = 4) -> dict:
    """enqueue_throughput for each configuration in ``cfgs`` (name -> QueueConfig fields), in
    ``rounds`` rounds of n / rounds messages each, the configurations taking turns, every round into
    a ring of the power of two >= n slots (as one run of n: the same cold memory).  The host's speed
    drifts within one session (benchmarks/NOTES.md), so configurations compared run side by side.
    Returns name -> the round with the median rate (of an even number, the upper middle one), with
    every round's rate, the best, and the totals over all rounds of messages, processed,
    mismatches and launches."""
    cap = 1 << max(10, (n - 1).bit_length())
    runs: dict = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            runs[name].append(enqueue_throughput(n // rounds, capacity=cap, **cfg))
    out = {}
    for name, rs in runs.items():
        rates = [r["enqueue_msg_per_s"] for r in rs]
        med = sorted(rs, key=lambda r: r["enqueue_msg_per_s"])[len(rs) // 2]
        out[name] = {
            **med,
            "messages": sum(r["messages"] for r in rs),
            "rounds_msg_per_s": rates,
            "best_msg_per_s": max(rates),
            "processed": sum(r["processed"] for r in rs),
            "mismatches": sum(r["mismatches"] for r in rs),
            "launches": sum(r["launches"] for r in rs),
        }
    return out


def sustained_one_thread(n: int, **cfg) -> dict:
    """One thread alternates: enqueue until the ring is full (timeout 0), then take what is done."""
    from gpuq_driver import QueueFull

    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(256)]
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=64, **cfg)) as q:
        enqueue, poll, take = q.enqueue, q.poll_completions, q.try_dequeue_result
        bad = got = i = 0
        t0 = time.perf_counter()
        while got < n:
            try:
                while i < n:
                    enqueue(payloads[i & 255], timeout=0)
                    i += 1
            except QueueFull:
                pass
            for mid in poll():
                bad += take(mid) != payloads[mid & 255]
                got += 1
        dt = time.perf_counter() - t0
        launches = q.stats().launches
    return {"messages": n, "msg_per_s": n / dt, "mismatches": int(bad), "launches": launches, **cfg}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [(k, v) for k, v in results["latency"].items()]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    names = [k for k, _ in rows]
    ax.barh(names, [v["p50_us"] for _, v in rows], color="tab:blue", label="p50")
    ax.barh(
        names,
        [v["p99_us"] - v["p50_us"] for _, v in rows],
        left=[v["p50_us"] for _, v in rows],
        color="tab:orange",
        alpha=0.6,
        label="p99",
    )
    ax.set_xlabel("round trip, µs (Python host, one message at a time)")
    ax.set_title(f"gpuq_driver on {results['env']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sim_dry_run(out: Path) -> int:
    """The queue parts on the CPU simulator, briefly (their figures mean nothing): the script's own
    check where there is no GPU.  Writes <out>/bench_latency.json; 1 if any result was wrong."""
    global GpuQueue
    real = GpuQueue
    GpuQueue = lambda cfg: real(QueueConfig(**{**cfg.__dict__, "backend": "sim"}))  # noqa: E731
    sys.setswitchinterval(1e-4)  # the spinning host thread hands the GIL to the simulator's sooner
    lat: dict = {"gpuq_round_trip_64B_1_block_1_warp": queue_round_trip(64, 200, blocks=1, threads_per_block=32)}
    cfgs = {"": {}, "_one_read": {"one_read": True}, "_one_read_never_leaves": {"one_read": True, "lease_ms": math.inf}}
    for name, r in round_trips_interleaved(64, 40, cfgs, warmup=10).items():
        lat[f"gpuq_round_trip_64B{name}"] = r
    lat["gpuq_first_after_5ms_idle_64B"] = after_idle(5, 0.005)
    lat["gpuq_first_after_50ms_idle_64B"] = after_idle(3, 0.05)
    lat["gpuq_first_after_5ms_idle_64B_parked"] = after_idle(3, 0.005, linger_ms=0.0)
    results = {
        "env": {"device": "sim", "python": platform.python_version(), "numpy": np.__version__},
        "latency": lat,
        "pause_resume": pause_resume(5),
        **{
            f"enqueue_throughput{name}": r
            for name, r in enqueue_throughput_interleaved(3000, {"": {}, "_one_read": {"one_read": True}}, 2).items()
        },
        "sustained_one_thread": sustained_one_thread(3000),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_latency.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "bench_latency.png")
    bad = sum(v.get("mismatches", 0) for v in lat.values())
    bad += sum(v["mismatches"] for k, v in results.items() if k.startswith("enqueue_throughput"))
    bad += results["sustained_one_thread"]["mismatches"]
    print(f"simulator dry run: {out / 'bench_latency.json'}, mismatches {bad}", flush=True)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description="GpuQueue latency and throughput vs launch-per-message")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--enqueue-messages", type=int, default=1_000_000)
    ap.add_argument("--sim", action="store_true", help="dry run of the queue parts on the CPU simulator")
    args = ap.parse_args()
    if args.sim:  # checks the script itself where there is no GPU; its figures mean nothing
        return sim_dry_run(Path(args.out))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ctx = driver.primary_context(0)
    info = driver.device_info(0)
    from importlib.metadata import version

    env = {
        "device": info.name,
        "arch": info.arch,
        "sm_count": info.sm_count,
        "driver": int(driver.check(driver._driver().cuDriverGetVersion())),
        "cuda_bindings": version("cuda-bindings"),
        "nvrtc": "{}.{}".format(*nvrtc_version()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_path": hostpath.status(),  # "compiled": enqueue and the take in C (gpuq_driver/hostpath.py)
    }
    # Host CPUs of the lent machines start slow (clocks ramp up under load): spin 2 s first, and
    # record how long an empty Python loop iteration takes, to compare runs across machines.
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        pass
    t0 = time.perf_counter()
    for _ in range(1_000_000):
        pass
    env["python_empty_loop_ns"] = round((time.perf_counter() - t0) * 1e3, 1)
    results: dict = {"env": env, "latency": {}}
    lat = results["latency"]
    floors, results["store_costs"] = floors_and_baselines(ctx, info, args.iters)
    lat.update(floors)
    queue_round_trip(64, args.iters // 2)  # warm-up (the first queue measured ran slower in early runs)
    never = {"lease_ms": math.inf}  # the kernel never leaves: the behaviour before leases, side by side
    for size in (64, 512, 4096):  # the one read (issue 11: one_read=True) beside the default, interleaved
        cfgs = {"": {}, "_one_read": {"one_read": True}}
        if size == 64:  # with a scout (QueueConfig.scouts), and the lease's share of the tail: 10 ms and never leaving
            cfgs.update(
                _one_read_scout={"one_read": True, "scouts": 1},
                _one_read_lease_10ms={"one_read": True, "lease_ms": 10.0},
                _one_read_never_leaves={"one_read": True, **never},
                # issue 11's configuration: the one read, a scout, and no lease change in the tail
                _one_read_scout_lease_10ms={"one_read": True, "scouts": 1, "lease_ms": 10.0},
                _one_read_scout_never_leaves={"one_read": True, "scouts": 1, **never},
            )
        for name, r in round_trips_interleaved(size, args.iters, cfgs).items():
            lat[f"gpuq_round_trip_{size}B{name}"] = r
    for name, cfg in (
        ("1_block_1_warp", {"blocks": 1, "threads_per_block": 32}),
        ("8_blocks_4_warps", {"blocks": 8, "threads_per_block": 128}),
    ):
        lat[f"gpuq_round_trip_64B_{name}"] = queue_round_trip(64, args.iters // 2, **cfg)
    lat["gpuq_round_trip_64B_again"] = queue_round_trip(64, args.iters)  # the same version twice: the spread
    lat["gpuq_round_trip_64B_never_leaves"] = queue_round_trip(64, args.iters, **never)
    lat["gpuq_first_after_5ms_idle_64B"] = after_idle(args.iters // 40, 0.005)
    lat["gpuq_first_after_50ms_idle_64B"] = after_idle(args.iters // 100, 0.05)
    lat["gpuq_first_after_5ms_idle_64B_parked"] = after_idle(args.iters // 40, 0.005, linger_ms=0.0)
    results["pause_resume"] = pause_resume(200)
    enq_cfgs = {
        "": {},
        "_never_leaves": never,
        "_one_read": {"one_read": True},
        "_one_read_scout": {"one_read": True, "scouts": 1},
    }
    for name, r in enqueue_throughput_interleaved(args.enqueue_messages, enq_cfgs).items():
        results[f"enqueue_throughput{name}"] = r
    results["sustained_one_thread"] = sustained_one_thread(args.enqueue_messages // 2)
    results["sustained_one_thread_never_leaves"] = sustained_one_thread(args.enqueue_messages // 2, **never)

    (out / "bench_latency.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "bench_latency.png")

    print(
        f"\n{env['device']} ({env['arch']}), driver {env['driver']}, cuda-bindings {env['cuda_bindings']}, "
        f"NVRTC {env['nvrtc']}, Python {env['python']} (empty loop {env['python_empty_loop_ns']} ns/iter), "
        f"host path {env['host_path']}"
    )
    print(f"{'round trip (one at a time); gpuq: to readable | to taken':52s} {'p50 us':>8s} {'p99 us':>8s}")
    for k, v in lat.items():
        extra = f"  | {v['taken_p50_us']:6.2f} {v['taken_p99_us']:6.2f}" if "taken_p50_us" in v else ""
        print(f"{k:52s} {v['p50_us']:8.2f} {v['p99_us']:8.2f}{extra}")
    e = results["enqueue_throughput_one_read"]
    rounds = ", ".join(f"{r:,.0f}" for r in e["rounds_msg_per_s"])
    print(f"enqueue, one Python thread, 64 B, one_read=True: {e['enqueue_msg_per_s']:,.0f} msg/s (rounds {rounds})")
    for suffix, label in (("", "lease 1 ms"), ("_never_leaves", "never leaves")):
        e = results["enqueue_throughput" + suffix]
        print(
            f"enqueue, one Python thread, 64 B, {label}: {e['enqueue_msg_per_s']:,.0f} msg/s "
            f"({e['enqueue_ns_per_msg']:.0f} ns/msg; rounds {', '.join(f'{r:,.0f}' for r in e['rounds_msg_per_s'])}), "
            f"then take {e['take_msg_per_s']:,.0f} msg/s, "
            f"mismatches {e['mismatches']}, launches {e['launches']}"
        )
        su = results["sustained_one_thread" + suffix]
        print(
            f"enqueue+take interleaved, one thread, ring 1024, {label}: {su['msg_per_s']:,.0f} msg/s, "
            f"mismatches {su['mismatches']}, launches {su['launches']}"
        )
    pr = results["pause_resume"]
    print(
        f"pause(): p50 {pr['pause']['p50_us']:.1f} us, p99 {pr['pause']['p99_us']:.1f} us; "
        f"resume(): p50 {pr['resume']['p50_us']:.1f} us"
    )
    bad = sum(v.get("mismatches", 0) for v in lat.values())
    bad += sum(v["mismatches"] for k, v in results.items() if k.startswith(("enqueue_throughput", "sustained")))
    print(f"wrong results, all parts: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
