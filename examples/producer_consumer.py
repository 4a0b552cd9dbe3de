#!/usr/bin/env python3
"""A producer thread and a consumer thread on one GPU-resident queue.

The producer enqueues random payloads of random lengths (0..slot_bytes); the consumer polls
completions, takes each result and checks it byte for byte against the payload that went in.
It prints a progress line about every second and a last one when all are in, then messages/s
and the p50/p99 round trip (enqueue -> result taken on the host, under full load, so queueing
time is included); it exits 0 only if every message came back intact: no mismatch, no loss.

    python examples/producer_consumer.py                  # 1,000,000 messages on GPU 0
    python examples/producer_consumer.py --messages 1e5 --slot-bytes 64
    python examples/producer_consumer.py --backend sim    # the CPU simulator, no GPU needed

Where no CUDA GPU exists (and --backend sim is not given) it prints one line and exits 2.
Ctrl-C stops the producer, takes the results of what was sent, prints the counts so far and
"interrupted", and exits 130.

Exit codes: 0 every message came back intact; 1 a message mismatched or was lost; 2 bad
arguments, or no usable GPU; 130 interrupted.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import numpy as np

from gpuq_driver import ConfigError, CudaUnavailable, GpuQueue, QueueConfig

MAX_MESSAGES = 100_000_000


def main(argv: list[str] | None = None, progress=None, prog: str = "producer_consumer") -> int:
    """Run the example; ``progress(received, total)``, if given, is called about every 0.1 s (the
    ``gpuq demo`` command draws its progress bar with it); ``prog`` names it in usage and
    messages.  Returns the exit status."""
    try:
        return run(argv, progress, prog)
    except KeyboardInterrupt:  # before the threads run (the queue starting: a compile, a launch)
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None, progress, prog: str) -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--messages", type=float, default=1_000_000, help="messages to send, a whole number (1e6 style too)"
    )
    ap.add_argument("--capacity", type=int, default=4096, help="ring slots, a power of two")
    ap.add_argument("--slot-bytes", type=int, default=512, help="max payload bytes, a multiple of 16")
    ap.add_argument("--backend", choices=["cuda", "sim"], default="cuda", help="the GPU, or the CPU simulator")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random payloads")
    args = ap.parse_args(argv)
    if not 1 <= args.messages <= MAX_MESSAGES or args.messages % 1:  # also refuses nan and inf
        ap.error(
            f"--messages {args.messages:g}: send a whole number of 1 to {MAX_MESSAGES:,.0f} messages "
            "(16 bytes of timing each are kept for the latency figures)"
        )
    n = int(args.messages)
    try:
        config = QueueConfig(capacity=args.capacity, slot_bytes=args.slot_bytes, backend=args.backend)
    except ConfigError as exc:
        ap.error(str(exc))  # exits 2 with the usage line

    try:
        queue = GpuQueue(config)
    except CudaUnavailable as exc:
        print(
            f"{prog}: needs an NVIDIA GPU with its driver; none usable here ({exc.text}); "
            "--backend sim runs the example on the CPU simulator",
            file=sys.stderr,
        )
        return 2

    # Payloads are random slices of one random pool: cheap to make, and each one is different.
    rng = random.Random(args.seed)
    pool_bytes = max(1 << 20, 2 * args.slot_bytes)  # room for a slice of any length up to slot_bytes
    pool = np.random.default_rng(args.seed).integers(0, 256, pool_bytes, dtype=np.uint8).tobytes()
    offsets = np.array([rng.randrange(len(pool) - args.slot_bytes) for _ in range(min(n, 1 << 16))])
    lengths = np.array([rng.randint(0, args.slot_bytes) for _ in range(min(n, 1 << 16))])
    sent_at = np.zeros(n, dtype=np.int64)  # ns, by msg_id (msg_ids are 0..n-1: one producer)
    taken_at = np.zeros(n, dtype=np.int64)
    mismatches: list[int] = []
    received = 0
    pool_view = memoryview(pool)
    stop = threading.Event()  # set by Ctrl-C: the producer stops, the consumer takes what was sent
    # Each thread says it is done with an Event, not with Thread.is_alive(): on CPython <= 3.12 a
    # Ctrl-C that lands in Thread.join() can mark a thread that is still running as stopped, and
    # the consumer then left one message in flight behind it (a CI run: "1 lost").
    sent_all, taken_all = threading.Event(), threading.Event()

    def producer() -> None:
        k = len(offsets)
        clock = time.perf_counter_ns
        try:
            for i in range(n):
                if stop.is_set():
                    return
                o, ln = int(offsets[i % k]), int(lengths[i % k])
                t = clock()
                sent_at[queue.enqueue(pool_view[o : o + ln], timeout=30)] = t
        finally:
            sent_all.set()

    def consumer() -> None:
        try:
            take()
        finally:
            taken_all.set()

    def take() -> None:
        nonlocal received
        k = len(offsets)
        clock = time.perf_counter_ns
        shown = 0.0
        while received < n:
            if stop.is_set() and sent_all.is_set() and received >= queue.stats().enqueued:
                return
            if progress is not None and time.monotonic() - shown > 0.1:
                progress(received, n)
                shown = time.monotonic()
            ids = queue.poll_completions()
            if not ids:
                time.sleep(0)
                continue
            for mid in ids:
                result = queue.try_dequeue_result(mid)
                taken_at[mid] = clock()
                o, ln = int(offsets[mid % k]), int(lengths[mid % k])
                if result != pool[o : o + ln]:
                    mismatches.append(mid)
            received += len(ids)

    with queue:
        threads = [
            threading.Thread(target=producer, name="producer"),
            threading.Thread(target=consumer, name="consumer", daemon=True),
        ]
        t0 = time.perf_counter()

        def show() -> None:
            """A progress line (the rate as the final line computes it)."""
            got = received  # before the enqueued count: never more received than sent on the line
            print(
                f"sent {queue.stats().enqueued:,}, received {got:,} of {n:,} messages, "
                f"{got / (time.perf_counter() - t0):,.0f} messages/s",
                flush=True,
            )

        def wait(done: threading.Event, timeout: float) -> None:
            """Wait for ``done`` (at most ``timeout`` s), printing a progress line about every second."""
            end = time.perf_counter() + timeout
            while not done.is_set() and (left := end - time.perf_counter()) > 0:
                if not done.wait(min(1.0, left)):
                    show()

        try:
            for t in reversed(threads):  # the consumer first: a producer alone could block on a full ring
                t.start()
            wait(sent_all, float("inf"))
            wait(taken_all, 60)
        except KeyboardInterrupt:  # Ctrl-C: stop sending, take what was sent, then report
            stop.set()
            wait(sent_all, float("inf"))
            wait(taken_all, 60)
        show()  # a last progress line, however short the run was
        elapsed = time.perf_counter() - t0
        stats = queue.stats()

    sent = stats.enqueued
    lost = (sent if stop.is_set() else n) - received
    rtt_us = (taken_at[:received] - sent_at[:received]) / 1e3
    p50, p99 = np.percentile(rtt_us, [50, 99]) if received else (float("nan"),) * 2
    print(
        f"device: {stats.backend}, {stats.blocks} blocks x {stats.threads_per_block} threads, "
        f"ring {stats.capacity} x {stats.slot_bytes} B"
    )
    print(f"messages: {sent:,} sent, {received:,} received, {len(mismatches)} mismatched, {lost} lost")
    print(f"throughput: {received / elapsed:,.0f} messages/s ({elapsed:.2f} s)")
    print(f"round trip under load: p50 {p50:.1f} us, p99 {p99:.1f} us")
    ok = not mismatches and lost == 0
    if stop.is_set():
        print(f"interrupted after {sent:,} of {n:,} messages" + ("" if ok else f"; first mismatches {mismatches[:10]}"))
        return 130
    print("OK" if ok else f"FAILED: first mismatches {mismatches[:10]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
