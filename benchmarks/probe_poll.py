#!/usr/bin/env python3
"""What the front warp's poll costs (issue 11 diagnostic): the 64 B round trip, one read and two,
with the default kernel and with kernels built with extra macros (--cases): GPUQ_SPEC_NO_CHECK
skips the one read's check (not a valid protocol: it shows what the check costs); --trace builds
with GPUQ_TRACE and prints the serving warp's SM cycles per stage.  The poll variants measured in
benchmarks/NOTES.md (the doorbell alone, + the header, + 64 bytes uncoalesced, relaxed doorbell
load) were macros of an earlier kernel, since removed: kernel options now choose the first two
(one_read=False reads the doorbell alone), and the last two were settled.
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


def trace(size: int, iters: int, one_read: bool, defines=(), **cfg) -> None:
    """Per-stage SM cycles of the serving warp (a GPUQ_TRACE build): poll issued -> returned ->
    payload in hand -> plugin done -> result released, and the polls each message took."""
    import numpy as np

    from gpuq_driver import GpuQueue, QueueConfig

    kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=("GPUQ_TRACE", *defines))
    payload = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
    rows = []
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=max(64, size), one_read=one_read, **cfg)) as q:
        pad, res_ids, mask = q._kernel.ctrl.pad, q._res_hdr, q._mask
        for i in range(iters):
            mid = q.enqueue(payload)
            while res_ids[((mid & mask) << 1) | 1] != mid:
                pass
            for _ in range(100000):
                if pad[5] == mid:
                    break
            q.try_dequeue_result(mid)
            if pad[5] == mid and i >= iters // 10:
                t = [int(pad[k]) for k in range(5)]
                rows.append(
                    [t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], int(pad[6]) & (1 << 40) - 1, int(pad[6]) >> 40]
                )
    a = np.array(rows)
    med = np.median(a, axis=0)
    ghz = float(np.median(a[:, :4].sum(axis=1) / np.maximum(a[:, 5], 1)))  # SM cycles per globaltimer ns
    print(
        f"trace {size} B one_read={one_read} {defines} {cfg} ({len(a)} msgs), median SM cycles: poll RT {med[0]:.0f}, "
        f"to payload {med[1]:.0f}, plugin {med[2]:.0f}, release {med[3]:.0f}; polls/msg median {med[4]:.0f}, "
        f"mean {a[:, 4].mean():.1f}; SM clock ~{ghz:.2f} GHz (poll issue -> release {med[5]:.0f} ns)",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--sizes", default="64")
    ap.add_argument(
        "--cases",
        default=",GPUQ_SPEC_NO_CHECK",
        help="comma-separated kernels to build: macros joined by '+', empty = the default kernel",
    )
    ap.add_argument("--trace", action="store_true", help="per-stage cycles from a GPUQ_TRACE build instead")
    ap.add_argument("--lease", type=float, default=1.0, help="lease_ms of the queues (inf: never leave)")
    args = ap.parse_args()
    bench_latency.queue_round_trip(64, args.iters // 2)  # warm-up
    if args.trace:
        from gpuq_driver import device_info

        print(device_info(0))
        for defines in [tuple(c.split("+")) if c else () for c in args.cases.split(",")]:
            for size in map(int, args.sizes.split(",")):
                for one_read in (True, False):
                    trace(size, args.iters, one_read, defines, lease_ms=args.lease)
        return 0
    cases = [tuple(c.split("+")) if c else () for c in args.cases.split(",")]
    for defines in cases:
        kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=defines)
        for size in map(int, args.sizes.split(",")):
            for one_read in (True, False):
                print(f"{defines or 'default'}:", end="")
                r = bench_latency.queue_round_trip(size, args.iters, one_read=one_read, lease_ms=args.lease)
                print(f"    served from the one read {r['spec_reads']}, retried {r['spec_retries']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
