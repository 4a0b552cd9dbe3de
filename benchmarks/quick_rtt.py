#!/usr/bin/env python3
"""A quick look at the per-message round trip, one read vs two (a subset of bench_latency.py, for a
short device call): 64 B, 512 B, 4 KB, each way in turn, p50/p99 readable and taken.

    PYTHONPATH=. python benchmarks/quick_rtt.py --iters 5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import queue_round_trip  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5000)
    args = ap.parse_args()
    queue_round_trip(64, args.iters // 2)  # warm-up
    for size in (64, 512, 4096):
        for one_read in (True, False):
            r = queue_round_trip(size, args.iters, one_read=one_read)
            print(
                f"    one_read={one_read}: spec_reads {r['spec_reads']}, retries {r['spec_retries']}, bad {r['mismatches']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
