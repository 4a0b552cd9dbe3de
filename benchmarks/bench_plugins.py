#!/usr/bin/env python3
"""The scoring plugin three ways: through GpuQueue, through BatchProcessor, and as CuPy code.

The computation (the built-in ``score`` plugin): a message is a float32 vector x of k values, the
queue's parameters a float32 weight matrix W of shape [k, n], the result the n float32 scores
x @ W.  For each k (default 64, 256, 1024: 256 B, 1 KB, 4 KB messages; n = 64 scores, 256 B):

  gpuq     GpuQueue(QueueConfig(plugin="score", params=W)): round trip of one message at a time
           (enqueue -> result taken; p50/p99 µs), and throughput with one Python thread keeping up
           to half the ring in flight (msg/s);
  gpuq_many  the same queue through its batch calls: enqueue_many of B rows, take_results of the
           B scores, two batches in flight (B = min(--batch, 2048)); latency: a batch of one;
  batch    BatchProcessor(plugin="score", params=W): one batch of 1 at a time (latency), and
           batches of --batch messages (throughput; one launch, one copy each way per batch);
  cupy     the same on CuPy: W on the device once; per batch one H2D copy of X, ``X @ W``, one D2H
           copy (latency: a batch of 1; throughput: batches of --batch).

Every result is checked against NumPy (float32, x @ W; tolerance 1e-3 relative to |x|·|W|, as
the device sums in another order).  The three run one after the other in one process, each
closed before the next starts (a BatchProcessor or CuPy beside a live queue would wait for its
leases).  Writes <out>/bench_plugins.json and <out>/bench_plugins.png and prints a table.

    PYTHONPATH=. python benchmarks/bench_plugins.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/bench_plugins.py --backend sim --messages 2000 --iters 200   # CPU dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
from plotting import pyplot  # benchmarks/plotting.py

from gpuq_driver import BatchProcessor, GpuQueue, QueueConfig


def pct(samples_ns) -> dict:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": len(a)}


def check(name: str, got: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    """Largest error of ``got`` against x @ W relative to the bound |x|·|W| (raises past 1e-3)."""
    want = x @ w
    scale = np.abs(x) @ np.abs(w) + 1e-30
    err = float(np.max(np.abs(got - want) / scale)) if len(got) else 0.0
    if not err <= 1e-3:
        raise AssertionError(f"{name}: scores differ from NumPy's x @ W (largest relative error {err:.3g})")
    return err


def slot_bytes_for(k: int, n: int) -> int:
    return -(-max(4 * k, 4 * n) // 16) * 16


def run_gpuq(x, w, iters: int, backend: str) -> dict:
    m, k = x.shape
    n = w.shape[1]
    cfg = QueueConfig(plugin="score", params=w, slot_bytes=slot_bytes_for(k, n), capacity=4096, backend=backend)
    with GpuQueue(cfg) as q:
        lat = []
        for i in range(iters):
            t0 = time.perf_counter_ns()
            r = q.wait_result(q.enqueue(x[i % m]), timeout=10)
            lat.append(time.perf_counter_ns() - t0)
        check("gpuq latency", np.frombuffer(r, np.float32)[None, :], x[(iters - 1) % m][None, :], w)
        out = np.empty((m, n), np.float32)
        window = cfg.capacity // 2  # messages in flight at most
        t0 = time.perf_counter()
        first = q.enqueue(x[0])  # msg_ids are consecutive: message i is first + i
        for i in range(1, m + window):
            if i < m:
                q.enqueue(x[i])
            if i >= window:
                j = i - window
                out[j] = np.frombuffer(q.wait_result(first + j, timeout=10), np.float32)
        dt = time.perf_counter() - t0
        stats = q.stats()
    return {"latency": pct(lat), "msg_per_s": m / dt, "err": check("gpuq", out, x, w), "launches": stats.launches}


def run_gpuq_many(x, w, iters: int, batch: int, backend: str) -> dict:
    """GpuQueue's batch calls: enqueue_many of [B, 4k] rows, take_results of the B scores, two
    batches in flight; latency: a batch of one through the same calls."""
    m, k = x.shape
    n = w.shape[1]
    batch = min(batch, 2048)  # two batches in flight in a ring of 4096
    cfg = QueueConfig(plugin="score", params=w, slot_bytes=slot_bytes_for(k, n), capacity=4096, backend=backend)
    rows = x.view(np.uint8)  # [m, 4k]
    with GpuQueue(cfg) as q:
        lat = []
        for i in range(iters):
            t0 = time.perf_counter_ns()
            data, lens = q.take_results(q.enqueue_many(rows[i % m : i % m + 1]), 1, timeout=10)
            lat.append(time.perf_counter_ns() - t0)
        out = np.empty((m, n), np.float32)
        inflight = []
        t0 = time.perf_counter()
        for s in range(0, m, batch):
            inflight.append((s, q.enqueue_many(rows[s : s + batch], timeout=10), len(rows[s : s + batch])))
            if len(inflight) == 2 or s + batch >= m:
                for s0, first, c in inflight:
                    data, lens = q.take_results(first, c, timeout=10)
                    if not (lens == 4 * n).all():
                        raise AssertionError(f"gpuq_many: result sizes {set(lens.tolist())}, expected {4 * n}")
                    out[s0 : s0 + c] = data[:, : 4 * n].view(np.float32)
                inflight.clear()
        dt = time.perf_counter() - t0
    return {"latency": pct(lat), "msg_per_s": m / dt, "err": check("gpuq_many", out, x, w), "batch": batch}


def run_batch(x, w, iters: int, batch: int, backend: str) -> dict:
    m, k = x.shape
    n = w.shape[1]
    bp = BatchProcessor(slot_bytes=slot_bytes_for(k, n), max_batch=batch, plugin="score", params=w, backend=backend)
    try:
        one = np.array([4 * k], np.uint32)
        lat = []
        for i in range(iters):
            t0 = time.perf_counter_ns()
            lens, data = bp.process_packed(one, x[i % m].tobytes())
            lat.append(time.perf_counter_ns() - t0)
        out = np.empty((m, n), np.float32)
        t0 = time.perf_counter()
        for s in range(0, m, batch):
            chunk = x[s : s + batch]
            lens, data = bp.process_packed(np.full(len(chunk), 4 * k, np.uint32), chunk)
            if not (lens == 4 * n).all():
                raise AssertionError(f"batch: result sizes {set(lens.tolist())}, expected {4 * n}")
            out[s : s + len(chunk)] = np.frombuffer(data, np.float32).reshape(len(chunk), n)
        dt = time.perf_counter() - t0
    finally:
        bp.close()
    return {"latency": pct(lat), "msg_per_s": m / dt, "err": check("batch", out, x, w)}


def run_cupy(x, w, iters: int, batch: int) -> dict:
    import cupy as cp

    m, k = x.shape
    n = w.shape[1]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        wd = cp.asarray(w)
        lat = []
        for i in range(iters):
            t0 = time.perf_counter_ns()
            r = cp.asnumpy(cp.asarray(x[i % m][None, :]) @ wd, stream=stream)
            lat.append(time.perf_counter_ns() - t0)
        out = np.empty((m, n), np.float32)
        t0 = time.perf_counter()
        for s in range(0, m, batch):
            out[s : s + batch] = cp.asnumpy(cp.asarray(x[s : s + batch]) @ wd, stream=stream)
        dt = time.perf_counter() - t0
    del r
    return {"latency": pct(lat), "msg_per_s": m / dt, "err": check("cupy", out, x, w)}


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for way in ("gpuq", "gpuq_many", "batch", "cupy"):
        ks = [int(k) for k in res["sizes"] if way in res["sizes"][k]]
        if not ks:
            continue
        a.plot([4 * k for k in ks], [res["sizes"][str(k)][way]["msg_per_s"] for k in ks], "o-", label=way)
        b.plot([4 * k for k in ks], [res["sizes"][str(k)][way]["latency"]["p50_us"] for k in ks], "o-", label=way)
    a.set(xscale="log", yscale="log", xlabel="message bytes (k float32)", ylabel="messages/s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="message bytes (k float32)", ylabel="p50 µs", title="one message")
    sizes = [4 * int(k) for k in res["sizes"]]
    for ax in (a, b):
        ax.set_xticks(sizes, [str(v) for v in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"score plugin: x[k] @ W[k, {res['n']}] ({res['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sizes", default="64,256,1024", help="k values: floats per message")
    ap.add_argument("--scores", type=int, default=64, help="n: scores per result")
    ap.add_argument("--messages", type=int, default=100_000, help="messages per throughput run")
    ap.add_argument("--iters", type=int, default=5000, help="messages per latency run")
    ap.add_argument("--batch", type=int, default=4096, help="messages per batch (batch and cupy)")
    ap.add_argument("--backend", choices=("cuda", "sim"), default="cuda")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = args.backend == "sim"
    have_cupy = not sim and importlib.util.find_spec("cupy") is not None
    device = "CPU simulator" if sim else _device_name()
    res: dict = {"n": args.scores, "device": device, "messages": args.messages, "batch": args.batch, "sizes": {}}
    rng = np.random.default_rng(0)
    print(f"score plugin, n = {args.scores}, {args.messages:,} messages per run, batch {args.batch} ({device})")
    print(f"{'k':>6} {'bytes':>6}  {'way':<9} {'msg/s':>12} {'p50 µs':>9} {'p99 µs':>9} {'rel err':>9}")
    for k in [int(s) for s in args.sizes.split(",")]:
        x = rng.standard_normal((args.messages, k), dtype=np.float32)
        w = rng.standard_normal((k, args.scores), dtype=np.float32)
        row = res["sizes"][str(k)] = {}
        if have_cupy:
            row["cupy"] = run_cupy(x, w, args.iters, args.batch)
        row["batch"] = run_batch(x, w, args.iters, args.batch, "numpy" if sim else "cuda")
        row["gpuq"] = run_gpuq(x, w, args.iters, args.backend)
        row["gpuq_many"] = run_gpuq_many(x, w, args.iters, args.batch, args.backend)
        for way, r in row.items():
            lat = r["latency"]
            print(
                f"{k:>6} {4 * k:>6}  {way:<9} {r['msg_per_s']:>12,.0f} {lat['p50_us']:>9.2f} {lat['p99_us']:>9.2f}"
                f" {r['err']:>9.1e}"
            )
    if not have_cupy:
        print("CuPy not run: " + ("the simulator dry run" if sim else "cupy is not installed"))
    (out / "bench_plugins.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "bench_plugins.png")
    print(f"wrote {out / 'bench_plugins.json'} and {out / 'bench_plugins.png'}")
    return 0


def _device_name() -> str:
    from gpuq_driver import driver

    return driver.device_info(0).name


if __name__ == "__main__":
    raise SystemExit(main())
