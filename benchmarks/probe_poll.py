#!/usr/bin/env python3
"""What the front warp's poll costs (issue 11 diagnostic): the 64 B round trip, one read and two,
with kernels built to poll the doorbell alone, the doorbell and the slot's header, or the doorbell,
header and first 64 bytes (GPUQ_POLL_SLOT = 0 / 1 / 2, gpuq_queue.cu), and with the doorbell read
relaxed instead of acquire (GPUQ_POLL_RELAXED: not a valid protocol, to see what the acquire costs).
Prints one line per case; writes nothing.

    PYTHONPATH=. python benchmarks/probe_poll.py --iters 3000
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_latency  # noqa: E402

from gpuq_driver import compiler, kernel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--sizes", default="64")
    args = ap.parse_args()
    bench_latency.queue_round_trip(64, args.iters // 2)  # warm-up
    for defines in ((), ("GPUQ_POLL_SLOT=0",), ("GPUQ_POLL_SLOT=1",), ("GPUQ_POLL_RELAXED",)):
        kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=defines)
        for size in map(int, args.sizes.split(",")):
            for one_read in (True, False):
                if defines and defines[0].startswith("GPUQ_POLL_SLOT") and one_read:
                    continue  # the one read needs the slot's bytes
                print(f"{defines or 'default'}:", end="")
                bench_latency.queue_round_trip(size, args.iters, one_read=one_read)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
