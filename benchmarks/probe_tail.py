#!/usr/bin/env python3
"""Where the 64 B round trip's tail comes from (issue 11 diagnostic): one message at a time, as
bench_latency.queue_round_trip, noting for each whether a lease began while it was in flight
(GpuqCtrlDev.leases_begun moved) and whether its own enqueue launched a lease (the producer queues
each successor while messages flow).  Prints, per lease_ms and one_read: p50/p99 of all round
trips, p99 of those with no lease change, the share that met a lease change and their median, the
share whose enqueue launched and their median, and the p99 of those with neither.

    PYTHONPATH=. python benchmarks/probe_tail.py --iters 5000
    PYTHONPATH=. python benchmarks/probe_tail.py --sim --iters 200   # the script's check on the CPU simulator

Exits 1 if any result came back wrong.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig  # noqa: E402


def run(
    iters: int, flow_ms: float | None = None, backend: str = "cuda", second: bool = True, graph: bool = True, **cfg
) -> int:
    """Prints two lines; returns the number of wrong results.  second: Leases.second (the producer
    queues a second lease during a hand-over, so that no later enqueue launches).  graph=False:
    each lease launched as before the thirteenth session (cuCtxSetCurrent, then
    cuLaunchCooperativeKernel) instead of by its graph (driver.CooperativeGraph)."""
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(16)]
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=64, backend=backend, **cfg)) as q:
        if flow_ms is not None:  # the lease keeper's look while messages flow (lease.Leases._flow_period)
            q._leases._flow_period = flow_ms / 1e3
        q._leases.second = second
        if not graph and backend == "cuda":
            q._kernel.graph = None  # PersistentKernel.launch falls back to the plain call
        looks = [0]
        watch = q._leases.watch

        def counted(*a, _watch=watch):  # the keeper's looks while a lease runs (each takes the GIL)
            looks[0] += 1
            return _watch(*a)

        q._leases.watch = counted
        res_ids, mask, begun, clock, leases = q._res_hdr, q._mask, q._begun, time.perf_counter_ns, q._leases
        lat = np.empty(iters, np.int64)
        moved = np.zeros(iters, bool)
        launched = np.zeros(iters, bool)
        looked = np.zeros(iters, bool)
        pos = np.zeros(iters, np.int64)  # round trips since the newest lease began (0: met the change)
        since = 0
        bad = 0
        warm = min(1000, iters // 5)
        for i in range(iters + warm):
            p = payloads[i & 15]
            b0, n0, k0 = begun[0], leases.launches, looks[0]
            t = clock()
            mid = q.enqueue(p)
            n1 = leases.launches
            idx = ((mid & mask) << 1) | 1
            while res_ids[idx] != mid:
                pass
            t1 = clock()
            bad += q.try_dequeue_result(mid) != p
            if i >= warm:
                lat[i - warm] = t1 - t
                moved[i - warm] = begun[0] != b0
                launched[i - warm] = n1 != n0  # this enqueue (or the keeper meanwhile) launched
                looked[i - warm] = looks[0] != k0
            since = 0 if begun[0] != b0 else since + 1
            if i >= warm:
                pos[i - warm] = since
    us = lat / 1e3
    calm = us[~moved]
    hit = us[moved]
    own = us[launched]
    quiet = us[~moved & ~launched]
    print(
        f"{cfg} {'graph' if graph else 'call'} keeper look {q._leases._flow_period * 1e3:g} ms: p50 {np.percentile(us, 50):.2f} p99 {np.percentile(us, 99):.2f} us; no lease change: p99 "
        f"{(np.percentile(calm, 99) if calm.size else math.nan):.2f}; lease changed in {moved.mean() * 100:.2f} % (median "
        f"{(np.median(hit) if hit.size else math.nan):.2f} us); a launch in the enqueue in {launched.mean() * 100:.2f} % "
        f"(median {(np.median(own) if own.size else math.nan):.2f} us); neither: p99 "
        f"{(np.percentile(quiet, 99) if quiet.size else math.nan):.2f}; bad {bad}",
        flush=True,
    )
    parts = [
        f"both (a launch in the round trip that met the change) {(moved & launched).mean() * 100:.2f} %",
        f"second={second}: keeper looked in {looked.mean() * 100:.2f} % (median "
        f"{(np.median(us[looked]) if looked.any() else math.nan):.2f})",
    ]
    for lo, hi in ((0, 0), (1, 1), (2, 2), (3, 5), (6, 20), (21, 1 << 62)):
        sel = us[(pos >= lo) & (pos <= hi) & ~moved & ~launched]
        if sel.size:
            parts.append(
                f"pos {lo}-{hi}: n {sel.size} p50 {np.percentile(sel, 50):.2f} p99 {np.percentile(sel, 99):.2f}"
            )
    print("   " + "; ".join(parts), flush=True)
    return int(bad)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--leases", default="1,10,inf", help="lease_ms values, comma-separated")
    ap.add_argument(
        "--flow-ms", default="", help="keeper look periods while messages flow to try (ms), comma-separated"
    )
    ap.add_argument("--second", default="1", help="Leases.second values to try (0/1), comma-separated")
    ap.add_argument("--launch", default="graph", help="lease launches to try (graph, call), comma-separated")
    ap.add_argument(
        "--sim", action="store_true", help="the CPU simulator (checks the script; its figures mean nothing)"
    )
    args = ap.parse_args()
    if args.iters < 2:
        ap.error("--iters must be at least 2")
    backend = "sim" if args.sim else "cuda"
    if args.sim:
        sys.setswitchinterval(1e-4)  # the spinning host thread hands the GIL to the simulator's sooner
    bad = run(args.iters // 2, backend=backend)  # warm-up
    flows = [float(f) for f in args.flow_ms.split(",") if f] or [None]
    for lease in args.leases.split(","):
        for flow in flows:
            for one_read in (True, False):
                for second, launch in itertools.product(args.second.split(","), args.launch.split(",")):
                    bad += run(
                        args.iters,
                        flow,
                        backend=backend,
                        second=second == "1",
                        graph=launch == "graph",
                        lease_ms=float(lease),
                        one_read=one_read,
                    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
