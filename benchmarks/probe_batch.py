#!/usr/bin/env python3
"""Where the time of a 64 B batch goes (issue 9 diagnostic): the kernel's drain rate alone and the
host's cost per batch call, on the GPU.

  kernel   enqueue_many of N messages at once, then time until the last result is readable
           (the kernel's rate with the host out of the way), for several grids.
  host     enqueue_many(B) and take_results(B, out=) timed alone (results already done).
Prints one line per case; writes nothing.

    PYTHONPATH=. python benchmarks/probe_batch.py
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig, compiler, kernel  # noqa: E402


def kernel_rate(size: int, n: int, tpb: int, blocks: int | None) -> float:
    cfg = QueueConfig(capacity=n, slot_bytes=size, threads_per_block=tpb, blocks=blocks)
    src = np.frombuffer(np.random.default_rng(1).bytes(n * size), np.uint8).reshape(n, size)
    out = np.empty((n, size), np.uint8)
    best = 0.0
    with GpuQueue(cfg) as q:
        for _ in range(4):
            first = q.enqueue_many(src)
            t0 = time.perf_counter()
            last = q._res_hdr  # flat uint64 [cap, 2]: word 1 is the msg_id (bulk.py)
            idx = (((first + n - 1) & (n - 1)) << 1) | 1
            while last[idx] != first + n - 1:
                pass
            dt = time.perf_counter() - t0
            q.take_results(first, n, timeout=30, out=out)
            assert np.array_equal(out, src)
            best = max(best, n / dt)
    return best


def host_costs(size: int, batch: int, reps: int = 50) -> tuple[float, float]:
    cap = 1 << 20
    with GpuQueue(QueueConfig(capacity=cap, slot_bytes=size)) as q:
        src = np.frombuffer(np.random.default_rng(2).bytes(batch * size), np.uint8).reshape(batch, size)
        out = np.empty((batch, size), np.uint8)
        te = tt = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            first = q.enqueue_many(src)
            te += time.perf_counter() - t0
            time.sleep(0.002)
            t0 = time.perf_counter()
            q.take_results(first, batch, timeout=10, out=out)
            tt += time.perf_counter() - t0
        return te / reps / batch * 1e9, tt / reps / batch * 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=1 << 18, help="messages drained at once (a power of two)")
    ap.add_argument("--tpb", default="64,256,1024", help="threads_per_block of the kernel cases, comma-separated")
    ap.add_argument("--kernel-only", action="store_true", help="skip the host cases")
    ap.add_argument(
        "--cases", default="", help="kernels to build for the kernel cases: macros joined by '+', comma-separated"
    )
    args = ap.parse_args()
    for b in () if args.kernel_only else (1024, 4096, 16384, 65536):
        e, t = host_costs(args.size, b)
        print(
            f"host  size={args.size} batch={b}: enqueue_many {e:.1f} ns/msg, take_results(out=) {t:.1f} ns/msg",
            flush=True,
        )
    for case in args.cases.split(","):
        defines = tuple(case.split("+")) if case else ()
        kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=defines)
        for tpb in map(int, args.tpb.split(",")):
            r = kernel_rate(args.size, args.n, tpb, None)
            print(
                f"kernel {defines or 'default'} size={args.size} tpb={tpb}: {r / 1e6:.2f} M msg/s, "
                f"{r * args.size / 1e9:.1f} GB/s each way ({args.n} at once)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
