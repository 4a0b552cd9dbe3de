#!/usr/bin/env python3
"""The torn-read stress of the one-read path (issue 11): many producer threads enqueue messages of
mixed sizes (half 0 .. 64 B, half up to 1 KB, across the 16- and 64-byte lines the front warp
reads) one at a time, each keeping a window in flight, and check every result byte for byte.  Reports wrong results, the
device's one-reads (``spec_reads``) and the reads whose check failed and were read again
(``spec_retries``: the torn-read counter).  Writes <out>/stress_one_read.json.

    PYTHONPATH=. python benchmarks/stress_one_read.py --messages 10000000 --out benchmarks/results
    PYTHONPATH=. python benchmarks/stress_one_read.py --backend sim --messages 20000 --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig, QueueFull  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--backend", choices=("cuda", "sim"), default="cuda")
    ap.add_argument("--messages", type=int, default=10_000_000)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--window", type=int, default=8, help="messages each producer keeps in flight")
    ap.add_argument("--max-bytes", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    # Half the messages 0 .. 64 bytes (the one read's window), half longer, shuffled: the front warp
    # reads the slot in its polls only while the last message served was checked (gpuq_layout.cuh,
    # "One read"), and a slot's previous occupant is as often longer as not (stale bytes past the
    # 16- and 64-byte lines).
    sizes = np.concatenate([rng.integers(0, 65, 2048), rng.integers(65, args.max_bytes + 1, 2048)])
    pool = [rng.bytes(int(k)) for k in rng.permutation(sizes)]
    pool[:8] = [b"", b"a", bytes(15), bytes(16), bytes(17), bytes(63), bytes(64), bytes(65)]
    per = args.messages // args.producers
    wrong, errors = [0] * args.producers, []
    cfg = QueueConfig(capacity=4096, slot_bytes=args.max_bytes, backend=args.backend, one_read=True)
    with GpuQueue(cfg) as q:
        # enqueue checks a message only where the front warp may be waiting for it (no backlog);
        # here every message of <= 64 bytes is checked, so that the torn-read case is hammered
        q._check_depth = 1 << 62

        def producer(t: int) -> None:
            try:
                inflight: deque = deque()
                k = t * 7919
                for _ in range(per):
                    p = pool[k & 4095]
                    k += 1
                    try:
                        mid = q.enqueue(p, timeout=0.01)
                    except QueueFull:  # the ring's oldest may be one of ours: take ours, then wait
                        while inflight:  # (a GIL-starved producer lapped by a whole ring waited on itself)
                            mid, want = inflight.popleft()
                            wrong[t] += q.wait_result(mid, timeout=30) != want
                        mid = q.enqueue(p, timeout=30)
                    inflight.append((mid, p))
                    if len(inflight) >= args.window:
                        mid, want = inflight.popleft()
                        wrong[t] += q.wait_result(mid, timeout=30) != want
                while inflight:
                    mid, want = inflight.popleft()
                    wrong[t] += q.wait_result(mid, timeout=30) != want
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(repr(exc))

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(args.producers)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t0
        q.shutdown()
        st = q.stats()
    res = {
        "backend": args.backend,
        "messages": per * args.producers,
        "producers": args.producers,
        "window": args.window,
        "sizes": f"0..{args.max_bytes} B",
        "seconds": dt,
        "msg_per_s": per * args.producers / dt,
        "wrong": sum(wrong),
        "errors": errors[:5],
        "processed": st.processed,
        "spec_reads": st.spec_reads,
        "spec_retries": st.spec_retries,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stress_one_read.json").write_text(json.dumps(res, indent=2))
    print(
        f"one-read stress: {res['messages']:,} messages ({res['sizes']}, {args.producers} producers) in {dt:.1f} s; "
        f"wrong {res['wrong']}, errors {len(errors)}; served from one read {st.spec_reads:,}, "
        f"torn or stale reads retried {st.spec_retries:,}"
    )
    return 0 if not errors and res["wrong"] == 0 and st.processed == res["messages"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
