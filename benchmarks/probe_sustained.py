#!/usr/bin/env python3
"""Why enqueue + take interleaved in one thread is slower with leases: the same loop as
bench_latency.sustained_one_thread under variants of the launch policy, with each launch
attributed to the thread that made it (producer = main thread, keeper, consumer).

    PYTHONPATH=. python benchmarks/probe_sustained.py [--messages 300000]
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig, QueueFull  # noqa: E402


def run(n: int, label: str, policy=None, **cfg) -> None:
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(256)]
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=64, **cfg)) as q:
        by = Counter()
        launch = q._kernel.launch

        def counted():
            by[threading.current_thread().name] += 1
            launch()

        q._kernel.launch = counted
        if policy:
            policy(q)
        enqueue, poll, take = q.enqueue, q.poll_completions, q.try_dequeue_result
        bad = got = i = full = empty_polls = 0
        t0 = time.perf_counter()
        while got < n:
            try:
                while i < n:
                    enqueue(payloads[i & 255], timeout=0)
                    i += 1
            except QueueFull:
                full += 1
            ids = poll()
            empty_polls += not ids
            for mid in ids:
                bad += take(mid) != payloads[mid & 255]
                got += 1
        dt = time.perf_counter() - t0
        s = q.stats()
    print(
        f"  {label:42s} {n / dt:10,.0f} msg/s  launches {s.launches:5d} {dict(by)}  full {full}  "
        f"empty polls {empty_polls}  bad {bad}",
        flush=True,
    )


def never_fresh(q):
    """The producer always queues the successor itself (the rule before lingering)."""
    leases = q._leases
    type(leases).after_publish = lambda self: self.kick(ahead=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=300_000)
    n = ap.parse_args().messages
    run(n // 3, "warm-up")
    run(n, "default (lease 1 ms, linger 100 ms)")
    run(n, "lease_ms=inf", lease_ms=math.inf)
    run(n, "linger_ms=0", linger_ms=0.0)
    run(n, "switch interval 0.5 ms", policy=lambda q: sys.setswitchinterval(5e-4))
    sys.setswitchinterval(5e-3)
    run(n, "lease 5 ms", lease_ms=5.0)
    run(n, "default again")
    run(n, "producer always ahead (old rule)", policy=never_fresh)


if __name__ == "__main__":
    main()
