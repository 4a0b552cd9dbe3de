#!/usr/bin/env python3
"""Where a Track A consumer's time goes: pre-fill a stream on an embedded redis-server, then run
one StreamWorker (or GpuBridge) over it under cProfile; prints msg/s, Redis µs per call and the
top functions by own time.

    PYTHONPATH=. python benchmarks/profile_consumer.py --frame 32 --size 64 --mode track_a
"""

import argparse
import cProfile
import pstats
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig  # noqa: E402
from gpuq_driver.streams import (  # noqa: E402
    BatchProcessor,
    GpuBridge,
    RedisServer,
    StreamConsumer,
    StreamProducer,
    StreamWorker,
    connect,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["track_a", "bridge"], default="track_a")
    ap.add_argument("--backend", default="cuda", help="track_a: cuda|numpy; bridge: cuda|sim")
    ap.add_argument("--frame", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    sb = max(64, -(-args.size // 16) * 16)
    with RedisServer() as server:
        client = connect(server.url, socket_timeout_s=30)
        pad = b"\xab" * (args.size - 16)
        StreamProducer(client, "p", maxlen=10**8, frame=args.frame).send_many(
            [struct.pack("<QQ", 0, q) + pad for q in range(args.messages)]
        )
        count = max(1, 4096 // args.frame)
        consumer = StreamConsumer(client, "p", "g", "c", count=count, block_ms=10, result_maxlen=10**8)
        if args.mode == "track_a":
            res = BatchProcessor(slot_bytes=sb, max_batch=8192, backend=args.backend)
            worker = StreamWorker(consumer, res)
        else:
            res = GpuQueue(QueueConfig(capacity=4096, slot_bytes=sb, backend=args.backend))
            worker = GpuBridge(consumer, res)
        client.config_resetstat()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        stats = worker.run(max_messages=args.messages, idle_exit_s=1)
        prof.disable()
        dt = time.perf_counter() - t0
        res.close()
        cmd = {
            k.removeprefix("cmdstat_"): (v["usec_per_call"], v["calls"]) for k, v in client.info("commandstats").items()
        }
        print(f"{args.mode} {args.backend} frame {args.frame} size {args.size}: {stats}")
        print(
            f"{stats.messages / dt:,.0f} msg/s under cProfile ({dt:.2f} s); Redis {server.version} µs/call, calls: {cmd}"
        )
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
