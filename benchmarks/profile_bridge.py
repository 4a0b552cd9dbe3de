#!/usr/bin/env python3
"""Where the bridge's host time goes per message, without a GPU: pre-fill a stream on an embedded
redis-server with framed messages, run one GpuBridge (or Track A's StreamWorker) over it, and split
its wall time into Redis round trips (XREADGROUP, the completion script: server time + reply
parsing), framing (frames -> entries, results -> frames), GpuQueue host calls (enqueue_many,
take_ready) and the loop's own bookkeeping; prints µs per message for each.

The queue runs on the CPU simulator, whose per-message Python is not the GPU's work and competes
for the GIL.  ``--kernel vector`` (default) replaces the simulator's lease, in this process only,
by one that serves everything up to the doorbell in a few NumPy calls (echo), so what is left is
the host side; ``--kernel sim`` keeps the real simulator and reports its thread's CPU time, which
is subtracted from the wall time in the "host-side" figure.

    PYTHONPATH=. python benchmarks/profile_bridge.py --frame 32 --messages 400000
    PYTHONPATH=. python benchmarks/profile_bridge.py --mode track_a --frame 32
"""

from __future__ import annotations

import argparse
import functools
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig, sim  # noqa: E402
from gpuq_driver.layout import (  # noqa: E402
    DOORBELL_HEAD_MASK,
    DOORBELL_STOP_SHIFT,
    KERNEL_EXITED,
    KERNEL_PARKED,
    KERNEL_RUNNING,
    STOP_ABORT,
    STOP_DRAIN,
    result_flags,
)
from gpuq_driver.streams import (  # noqa: E402
    BatchProcessor,
    GpuBridge,
    RedisServer,
    StreamConsumer,
    StreamProducer,
    StreamWorker,
    connect,
)
from gpuq_driver.streams import bridge as bridge_mod  # noqa: E402
from gpuq_driver.streams import consumer as consumer_mod  # noqa: E402
from gpuq_driver.streams import worker as worker_mod  # noqa: E402

_DONE_WORD = np.uint64(result_flags() << 32)


def vector_lease(self) -> None:
    """SimulatedKernel._lease for the echo plugin, serving every message up to the doorbell at once
    (the same protocol: data, then the length word, then the msg_id; lease end and stop as the
    simulator's)."""
    lay, mem, sb, cap = self.layout, self.mem, self.config.slot_bytes, self.config.capacity
    req_hdr = np.frombuffer(lay.view(mem, "req_hdr", "Q"), np.uint64).reshape(cap, 2)
    res_hdr = np.frombuffer(lay.view(mem, "res_hdr", "Q"), np.uint64).reshape(cap, 2)
    req = np.frombuffer(lay.view(mem, "req_data"), np.uint8).reshape(cap, sb)
    res = np.frombuffer(lay.view(mem, "res_data"), np.uint8).reshape(cap, sb)
    counter = lay.view(mem, "warp_counters", "Q")
    ctrl = self.ctrl
    ctrl.warps = 1
    ctrl.leases_begun = ctrl.leases_ended + 1
    ctrl.state = KERNEL_RUNNING
    start, seq, stop, idle = time.monotonic(), self._claim, 0, 0
    while not self.closed:
        leaving = time.monotonic() - start >= self._lease_s
        if leaving:
            ctrl.leases_leaving = ctrl.leases_begun
        db = self.doorbell[0]
        stop, head = db >> DOORBELL_STOP_SHIFT, db & DOORBELL_HEAD_MASK
        if stop == STOP_ABORT:
            break
        if seq < head:
            idle = 0
            slots = np.arange(seq, head, dtype=np.int64) & (cap - 1)
            words = req_hdr[slots, 0]
            assert (req_hdr[slots, 1] == np.arange(seq, head, dtype=np.uint64)).all()
            res[slots] = req[slots]  # echo: whole slots (the length word says how much counts)
            res_hdr[slots, 0] = (words & np.uint64(0xFFFFFFFF)) | _DONE_WORD
            res_hdr[slots, 1] = req_hdr[slots, 1]
            seq = head
            counter[0] = seq
        elif leaving or stop == STOP_DRAIN:
            break
        else:
            idle += 1
            time.sleep(0 if idle < 100 else min(1e-3, 1e-6 * idle))
    self._claim = seq
    ctrl.leases_leaving = ctrl.leases_ended + 1
    ctrl.state = KERNEL_EXITED if stop in (STOP_DRAIN, STOP_ABORT) else KERNEL_PARKED
    ctrl.leases_ended += 1  # last, after the state, as the simulator and end_lease


class Timers:
    """Accumulated wall time and calls per name, by wrapping callables in place."""

    def __init__(self):
        self.s, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, owner, attr: str, name: str) -> None:
        real = getattr(owner, attr)

        @functools.wraps(real)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t
                self.calls[name] += 1

        setattr(owner, attr, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["bridge", "track_a"], default="bridge")
    ap.add_argument("--kernel", choices=["vector", "sim"], default="vector", help="bridge: see the docstring")
    ap.add_argument("--frame", type=int, default=32, help="messages per stream entry")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--messages", type=int, default=400_000)
    ap.add_argument("--count", type=int, default=0, help="entries per XREADGROUP (default: 4096 messages' worth)")
    args = ap.parse_args()
    if args.kernel == "vector":
        sim.SimulatedKernel._lease = vector_lease
    sb = max(64, -(-args.size // 16) * 16)
    with RedisServer() as server:
        client = connect(server.url, socket_timeout_s=30)
        pad = b"\xab" * (args.size - 16)
        StreamProducer(client, "p", maxlen=10**8, frame=args.frame).send_many(
            [struct.pack("<QQ", 0, q) + pad for q in range(args.messages)]
        )
        count = args.count or max(1, 4096 // args.frame)
        cons = StreamConsumer(client, "p", "g", "c", count=count, block_ms=10, result_maxlen=10**8)
        t = Timers()
        t.wrap(cons.client, "xreadgroup", "redis: XREADGROUP (round trip + parse)")
        t.wrap(cons, "_complete", "redis: completion script (round trip)")
        parse = "_entries" if hasattr(consumer_mod, "_entries") else "_entry"  # older code: one call a frame
        t.wrap(consumer_mod, parse, "framing: frame -> Entry")
        if args.mode == "track_a":
            res = BatchProcessor(slot_bytes=sb, max_batch=8192, backend="numpy")
            worker = StreamWorker(cons, res)
            t.wrap(worker_mod, "join_frame", "framing: results -> frames")
            t.wrap(res, "process_packed", "BatchProcessor (numpy echo)")
        else:
            res = GpuQueue(QueueConfig(capacity=4096, slot_bytes=sb, backend="sim"))
            worker = GpuBridge(cons, res)
            joiner = (
                "join_frames" if hasattr(bridge_mod, "join_frames") else "join_frame"
            )  # the older bridge: one a frame
            t.wrap(bridge_mod, joiner, "framing: results -> frames")
            t.wrap(res, "enqueue_many", "GpuQueue: enqueue_many")
            t.wrap(res, "take_ready", "GpuQueue: take_ready")
        t.wrap(cons, "complete", "complete() incl. script")
        kthread = getattr(getattr(res, "_kernel", None), "_thread", None)
        client.config_resetstat()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        stats = worker.run(max_messages=args.messages, idle_exit_s=1)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        sim_cpu = time.clock_gettime(time.pthread_getcpuclockid(kthread.ident)) if kthread is not None else 0.0
        res.close()
        cmd = {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}
        n = stats.messages
        assert n == args.messages and stats.failed == 0, stats
        per = {k: v / n * 1e6 for k, v in t.s.items()}
        per["complete() incl. script"] -= per.pop("redis: completion script (round trip)", 0.0)
        per["framing: results -> frames (in complete)"] = per.pop("complete() incl. script")
        per["redis: completion script (round trip)"] = t.s["redis: completion script (round trip)"] / n * 1e6
        per["loop bookkeeping (the rest)"] = dt / n * 1e6 - sum(per.values()) - (0 if args.kernel == "vector" else 0)
        kern = "" if args.mode == "track_a" else f", kernel {args.kernel}"
        print(f"{args.mode}{kern}: {n:,} messages of {args.size} B, {args.frame} per entry, {count} entries per read")
        print(f"  wall {dt:.3f} s = {n / dt:,.0f} msg/s; this thread's CPU {cpu / n * 1e6:.3f} µs/msg", end="")
        if kthread is not None:
            print(
                f"; simulator thread CPU {sim_cpu / n * 1e6:.3f} µs/msg; "
                f"host side (wall - simulator CPU) {(dt - sim_cpu) / n * 1e6:.3f} µs/msg = {n / (dt - sim_cpu):,.0f} msg/s"
            )
        else:
            print()
        for k, v in sorted(per.items()):
            calls = t.calls.get(k.split(" (in")[0], "")
            print(f"  {k:45s} {v:7.3f} µs/msg  {calls}")
        srv = {k: round(cmd[k]["usec"] / n, 3) for k in ("xreadgroup", "evalsha", "xack", "xadd") if k in cmd}
        print(f"  Redis {server.version} server CPU µs per message, inside the round trips: {srv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
