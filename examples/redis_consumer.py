#!/usr/bin/env python3
"""Consume a Redis stream through the GPU (Track A), at-least-once, and check every result.

One member of a consumer group reads entries, processes their messages with the echo plugin and
publishes the results to ``<stream>:results``, acking each entry atomically with its results.
Two ways to process:

  --mode batch   StreamWorker + BatchProcessor: one kernel launch per batch (the baseline);
  --mode bridge  GpuBridge: every message goes into a running GpuQueue (the persistent kernel).

    python examples/redis_consumer.py                          # self-contained demo, no setup
    python examples/redis_consumer.py --mode bridge --backend sim --messages 20000
    python examples/redis_consumer.py --redis-url redis://localhost:6379/0   # or set REDIS_URL
    python examples/redis_consumer.py --simulate-crash 50      # show reclaim of a dead consumer's entries

Without --redis-url (or REDIS_URL) it starts an embedded redis-server and first produces
--messages numbered test messages itself (as examples/redis_producer.py does).  It stops once no
new message came for --idle-exit seconds (or after --max-messages), prints the counts, then reads
the result stream and compares every result published during the run byte for byte with its
source message (the echo plugin returns its input).  After Ctrl-C it prints the counts and skips
that check.

Exit codes: 0 every result matched; 1 mismatched, duplicate or missing results; 2 bad arguments,
--backend cuda and no usable GPU, or redis-py not installed; 3 Redis unreachable or unusable;
130 interrupted (counts are still printed, results not verified; entries not acked stay pending
and are reclaimed by the next consumer).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

# The payload format and the producing loop are shared with the producer example (same folder).
from redis_producer import HEADER, MAX_SIZE, check_ints, payload_seq, produce, status, stop_on_signal

from gpuq_driver import CudaUnavailable, GpuQueue, QueueConfig
from gpuq_driver.errors import BrokerError, ConfigError
from gpuq_driver.layout import check_slot_bytes
from gpuq_driver.streams import (
    BatchProcessor,
    GpuBridge,
    RedisServer,
    StreamConsumer,
    StreamProducer,
    StreamWorker,
    connect,
    read_results,
)
from gpuq_driver.streams.consumer import MAX_COUNT
from gpuq_driver.streams.server import broker_errors, client_url
from gpuq_driver.streams.wire import FRAME, PAYLOAD, decode_frame


def make_engine(args):
    """The GPU side: a BatchProcessor (batch) or a started GpuQueue (bridge), and its description.

    Raises CudaUnavailable where --backend cuda was asked for and no GPU is usable.
    """
    if args.mode == "batch":
        processor = BatchProcessor(slot_bytes=args.slot_bytes, max_batch=args.max_batch, backend=args.backend)
        where = "the GPU, one launch per batch" if processor.backend == "cuda" else "NumPy on the CPU (no GPU)"
        return processor, f"StreamWorker + BatchProcessor on {where}"
    backend = "cuda" if args.backend in ("auto", "cuda") else "sim"
    try:
        queue = GpuQueue(QueueConfig(capacity=args.capacity, slot_bytes=args.slot_bytes, backend=backend))
    except CudaUnavailable as exc:
        if args.backend == "cuda":
            raise
        print(f"note: no usable GPU ({exc.text}); --mode bridge falls back to the CPU simulator (--backend sim)")
        queue = GpuQueue(QueueConfig(capacity=args.capacity, slot_bytes=args.slot_bytes, backend="sim"))
    where = "the persistent kernel" if queue.stats().backend == "cuda" else "the CPU simulator"
    return queue, f"GpuBridge into a GpuQueue on {where}"


def source_messages(fields: dict) -> list:
    """The messages of one source entry: a plain entry's payload, or a frame's items ([] for
    an entry that is neither: it was completed with no results)."""
    try:
        return [fields[PAYLOAD]] if PAYLOAD in fields else decode_frame(fields[FRAME])
    except (KeyError, ValueError):
        return []


def last_result_id(client, result_stream: str):
    """Id of the newest entry in the result stream, or "0": results after it are this run's."""
    with broker_errors(client_url(client), f"XREVRANGE {result_stream}"):
        newest = client.xrevrange(result_stream, count=1)
    return newest[0][0] if newest else "0"


def verify(client, stream: str, result_stream: str, after, slot_bytes: int, expected: int | None) -> dict:
    """Compare every result published after ``after`` with its source message.

    A result must equal its payload (echo), or be absent (None) only where the payload was
    larger than a slot.  Where trimming has deleted the source entry, the result is checked
    against the payload format instead (``by_pattern``).  ``duplicates``: source entries whose
    results appear twice (the Lua publish + ack must make that impossible).  With ``expected``
    (the demo produced messages 0 .. expected-1), ``missing`` counts numbers with no result.
    """
    out = dict(checked=0, mismatched=0, duplicates=0, by_pattern=0, missing=0, examples=[])
    started = last_print = time.perf_counter()
    seen_entries: set = set()
    seen_seqs = bytearray(expected) if expected else None

    def show(final: bool = False) -> None:
        now = time.perf_counter()
        status(
            f"verify: {out['checked']:,}{f' / {expected:,}' if expected else ''} results checked, "
            f"{out['mismatched']:,} mismatched, {out['checked'] / max(now - started, 1e-9):,.0f} results/s",
            final,
        )

    while True:
        # A handful of result entries at a time (each holds up to 1000 source entries' results)
        after, rows = read_results(client, result_stream, after, count=10)
        if not rows:
            break
        # Their source entries, one pipelined XRANGE id id each
        sources = list(dict.fromkeys(src for (src, _), _ in rows))
        with broker_errors(client_url(client), f"XRANGE {stream}"):
            pipe = client.pipeline(transaction=False)
            for src in sources:
                pipe.xrange(stream, src, src)
            found = pipe.execute()
        payloads = {src: (source_messages(f[0][1]) if f else None) for src, f in zip(sources, found)}
        for (src, i), result in rows:
            if i == 0:
                out["duplicates"] += src in seen_entries
                seen_entries.add(src)
            out["checked"] += 1
            source = payloads[src]
            if source is None:  # the source entry was trimmed away: check the result's own format
                out["by_pattern"] += 1
                seq = payload_seq(result) if result is not None else None
                ok = result is None or seq is not None
            elif i < len(source):
                want = bytes(source[i])
                ok = result == want if result is not None else len(want) > slot_bytes
                seq = payload_seq(want) if seen_seqs is not None else None
            else:  # more results than the entry has messages
                ok, seq = False, None
            if not ok:
                out["mismatched"] += 1
                if len(out["examples"]) < 5:
                    out["examples"].append((src, i))
            if seen_seqs is not None and seq is not None and seq < expected:
                seen_seqs[seq] = 1
        now = time.perf_counter()
        if now - last_print >= 1.0:  # a progress line about every second
            last_print = now
            show()
    if out["checked"]:  # and a last one, however short the check was
        show(final=True)
    if seen_seqs is not None:
        out["missing"] = expected - sum(seen_seqs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1])
    ap.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis to read from (default: $REDIS_URL; neither: an embedded redis-server "
        "and --messages test messages produced first)",
    )
    ap.add_argument("--stream", default="gpuq:in", help="stream key (default gpuq:in); results go to <stream>:results")
    ap.add_argument("--group", default="gpuq", help="consumer group (default gpuq; created if missing)")
    ap.add_argument(
        "--consumer",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="consumer name, unique in the group (default host-pid)",
    )
    ap.add_argument("--mode", choices=["batch", "bridge"], default="batch")
    ap.add_argument(
        "--backend",
        choices=["auto", "cuda", "numpy", "sim"],
        default="auto",
        help="batch: auto|cuda|numpy; bridge: auto|cuda|sim (auto: the GPU where usable, else the CPU path)",
    )
    ap.add_argument("--count", type=int, default=1000, help="entries per XREADGROUP (default 1000)")
    ap.add_argument("--block-ms", type=int, default=1000, help="XREADGROUP BLOCK when idle, ms (default 1000)")
    ap.add_argument(
        "--claim-idle-ms",
        type=int,
        default=None,
        help="reclaim entries pending this long, ms (default 30000; 500 with --simulate-crash)",
    )
    ap.add_argument(
        "--idle-exit", type=float, default=2.0, help="stop after this many seconds without new messages (default 2)"
    )
    ap.add_argument(
        "--max-messages",
        type=float,
        default=None,
        metavar="N",
        help="stop after at least N messages (N >= 1), at the first batch boundary at or after N: up to "
        "one batch more (a read of --count entries; in bridge mode, also what is in the queue then)",
    )
    ap.add_argument("--slot-bytes", type=int, default=512, help="max message bytes on the GPU (default 512)")
    ap.add_argument("--max-batch", type=int, default=None, help="--mode batch only: messages per launch (default 4096)")
    ap.add_argument("--capacity", type=int, default=None, help="--mode bridge only: GpuQueue ring slots (default 4096)")
    ap.add_argument(
        "--messages",
        type=float,
        default=None,
        help="self-contained demo only (no Redis URL): messages to produce (default 1e5)",
    )
    ap.add_argument("--size", type=int, default=None, help="self-contained demo only: payload bytes (default 64)")
    ap.add_argument("--frame", type=int, default=None, help="self-contained demo only: messages per entry (default 1)")
    ap.add_argument(
        "--simulate-crash",
        type=int,
        default=0,
        metavar="ENTRIES",
        help="before starting, a second consumer takes this many entries and never acks them",
    )
    args = ap.parse_args(argv)
    if args.mode == "batch" and args.backend == "sim":
        ap.error("--backend sim is the GpuQueue simulator, for --mode bridge; batch mode's CPU path is --backend numpy")
    if args.mode == "bridge" and args.backend == "numpy":
        ap.error("--backend numpy is BatchProcessor's CPU path, for --mode batch; bridge mode's is --backend sim")
    # Every argument is checked here, before a server starts (nan and inf fail these comparisons),
    # with the limits of the library objects built later; a flag the run would ignore is refused.
    flag, value = {"batch": ("--capacity", args.capacity), "bridge": ("--max-batch", args.max_batch)}[args.mode]
    if value is not None:
        ap.error(f"{flag} {value}: for the other --mode; --mode {args.mode} does not use it")
    for flag, value in (("--messages", args.messages), ("--size", args.size), ("--frame", args.frame)):
        if args.redis_url and value is not None:
            ap.error(f"{flag} {value:g}: for the self-contained demo only, not with a Redis URL (or REDIS_URL)")
    messages = 100_000 if args.messages is None else args.messages
    args.size = 64 if args.size is None else args.size
    args.frame = 1 if args.frame is None else args.frame
    args.max_batch = 4096 if args.max_batch is None else args.max_batch
    args.capacity = 4096 if args.capacity is None else args.capacity
    if not args.redis_url and (not 1 <= messages <= 1e9 or messages % 1):
        ap.error(f"--messages {messages:g}: produce a whole number of 1 to 1,000,000,000 messages")
    n = 0 if args.redis_url else int(messages)  # the self-contained demo's count
    if not HEADER <= args.size <= MAX_SIZE:
        ap.error(f"--size {args.size}: payloads are {HEADER} .. {MAX_SIZE} bytes")
    for flag, value in (("--stream", args.stream), ("--group", args.group), ("--consumer", args.consumer)):
        if not value:
            ap.error(f"{flag} '': must not be empty")
    if not 0 < args.idle_exit < float("inf"):
        ap.error(f"--idle-exit {args.idle_exit:g}: must be a number of seconds > 0")
    if args.max_messages is not None and (not 1 <= args.max_messages < float("inf") or args.max_messages % 1):
        ap.error(f"--max-messages {args.max_messages:g}: must be a whole number of messages >= 1")
    check_ints(
        ap,
        [
            ("--count", args.count, 1, MAX_COUNT),
            ("--block-ms", args.block_ms, 0, None),
            ("--claim-idle-ms", 0 if args.claim_idle_ms is None else args.claim_idle_ms, 0, None),
            ("--frame", args.frame, 1, None),
            ("--max-batch", args.max_batch, 1, 1 << 20),
            ("--simulate-crash", args.simulate_crash, 0, None),
        ],
    )
    try:
        check_slot_bytes(args.slot_bytes)
        if args.mode == "bridge":
            QueueConfig(capacity=args.capacity, slot_bytes=args.slot_bytes, backend="sim")
    except ConfigError as exc:  # the library's field names, given as the flags
        ap.error(str(exc).replace("slot_bytes", "--slot-bytes").replace("capacity", "--capacity"))
    if not args.redis_url and args.size > args.slot_bytes:
        ap.error(f"--size {args.size} is over --slot-bytes {args.slot_bytes}: every message would fail")
    claim_idle_ms = args.claim_idle_ms if args.claim_idle_ms is not None else 500 if args.simulate_crash else 30_000
    max_messages = None if args.max_messages is None else int(args.max_messages)

    server = client = engine = None
    try:
        # 1. The GPU side first, so a missing GPU is reported before anything else happens.
        try:
            engine, engine_text = make_engine(args)
        except CudaUnavailable as exc:
            print(
                f"redis_consumer: --backend cuda needs an NVIDIA GPU with its driver; none usable here ({exc.text}); "
                "--backend sim (or numpy) runs it on the CPU",
                file=sys.stderr,
            )
            return 2

        # 2. Redis: the given URL, or an embedded redis-server for a self-contained demo.
        self_contained = not args.redis_url
        if self_contained:
            server = RedisServer()
            url = server.url
            print(f"self-contained demo: started an embedded redis-server {server.version} at {url}")
        else:
            url = args.redis_url
        client = connect(url)

        # 3. Join the group (created at the start of the stream if missing).  Results published
        #    from now on are this run's: remember where the result stream ends.
        consumer = StreamConsumer(
            client,
            args.stream,
            args.group,
            args.consumer,
            count=args.count,
            block_ms=args.block_ms,
            claim_idle_ms=claim_idle_ms,
        )
        results_from = last_result_id(client, consumer.result_stream)

        # 4. The demo produces its own messages 0 .. n-1.
        if self_contained:
            producer = StreamProducer(client, args.stream, frame=args.frame)
            elapsed = produce(producer, n, args.size, label="demo: produced")
            print(
                f"demo: produced {producer.sent_messages:,} messages of {args.size} B in "
                f"{producer.sent_entries:,} entries ({producer.sent_messages / elapsed:,.0f} msg/s)"
            )

        # 5. Optionally play a consumer that crashes: it takes entries and never acks them.  They
        #    stay in the group's pending list until this consumer reclaims them (XAUTOCLAIM) once
        #    they have been idle for claim_idle_ms; so wait at least that long before exiting.
        idle_exit = args.idle_exit
        if args.simulate_crash:
            ghost = StreamConsumer(client, args.stream, args.group, f"{args.consumer}-crashed")
            taken = ghost.read(count=args.simulate_crash, block_ms=0)
            print(
                f"simulated crash: {len(taken)} entries delivered to {ghost.consumer!r}, never acked; "
                f"reclaimed once idle {claim_idle_ms} ms"
            )
            needed = (claim_idle_ms + args.block_ms) / 1000 + 1.0
            if idle_exit < needed:
                idle_exit = needed
                print(f"note: --idle-exit raised to {idle_exit:g} s so those entries can be reclaimed first")

        # 6. Run: read (or reclaim) -> process -> publish results + XACK, until idle.
        worker = StreamWorker(consumer, engine) if args.mode == "batch" else GpuBridge(consumer, engine)
        print(f"consumer {args.consumer!r} of group {args.group!r} on {args.stream} at {url}: {engine_text}")
        start = last_done = last_print = time.perf_counter()
        done_before = printed_before = 0

        def rate() -> float:
            """msg/s over the time work was done (start: the end of the last step before the first
            result; the idle wait before exiting is not counted): the progress lines and the
            final figure are both this."""
            return done_before / max(last_done - start, 1e-9)

        def progress(stats, final: bool = False) -> None:  # called after every step
            nonlocal start, last_done, last_print, done_before, printed_before
            now = time.perf_counter()
            if stats.messages != done_before:
                done_before, last_done = stats.messages, now
            elif not done_before:
                start = now
            # a line about every second (on a terminal, or in a log while messages flow), and a
            # last one with the final figures
            if (
                now - last_print >= 1.0
                and (sys.stdout.isatty() or stats.messages != printed_before)
                or final
                and stats.messages != printed_before
            ):
                last_print, printed_before = now, stats.messages
                status(
                    f"consumed {stats.messages:,} messages ({stats.entries:,} entries), "
                    f"{stats.reclaimed:,} reclaimed, {rate():,.0f} msg/s"
                )

        # Ctrl-C stops it after the step in progress, once what was taken is published
        # (a second Ctrl-C at once)
        with stop_on_signal() as stop:
            try:
                stats = worker.run(
                    max_messages=max_messages, idle_exit_s=idle_exit, progress=progress, progress_every_s=0.0, stop=stop
                )
            except KeyboardInterrupt:
                stats = worker.stats
        interrupted = stop.is_set()
        progress(stats, final=True)
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        print(
            f"counts: messages {stats.messages:,}, entries {stats.entries:,}, failed {stats.failed:,}, "
            f"reclaimed {stats.reclaimed:,}, duplicates {stats.duplicates:,}, lost {stats.lost:,}"
        )
        print(
            f"throughput: {rate():,.0f} msg/s ({max(last_done - start, 0):.2f} s from the first read "
            "to the last result)"
        )
        if interrupted:
            print(
                f"interrupted: {consumer.pending():,} entries still pending in group {args.group!r} "
                "(a consumer reclaims them after --claim-idle-ms)"
            )
            print("verify skipped: interrupted")
            return 130

        # 7. Check every result published during the run against its source message.
        #    The demo knows what it produced, so it also counts messages with no result, unless
        #    the run was cut short on purpose.
        expected = n if self_contained and max_messages is None else None
        check = verify(client, args.stream, consumer.result_stream, results_from, args.slot_bytes, expected)
        missing = f", {check['missing']:,} missing" if expected else ""
        print(
            f"verify: {check['checked']:,} results in {consumer.result_stream} checked against their source "
            f"messages: {check['mismatched']:,} mismatched, {check['duplicates']:,} duplicates{missing}"
            + (f" ({check['by_pattern']:,} by payload format: source trimmed)" if check["by_pattern"] else "")
        )
        ok = not (check["mismatched"] or check["duplicates"] or check["missing"])
        print("OK" if ok else f"FAILED: first mismatched (entry id, index): {check['examples']}")
        return 0 if ok else 1
    except ConfigError as exc:  # a malformed URL, a bad --count / --capacity / --slot-bytes ...
        print(f"redis_consumer: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:  # BrokerUnavailable (unreachable, connection lost) or no redis-server binary
        print(f"redis_consumer: {exc}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        print("redis_consumer: needs redis-py: pip install -e '.[redis]' (from a checkout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        # Explicit cleanup, GPU side first (a GpuQueue drains what is still queued), then Redis.
        if engine is not None:
            engine.close()
        if client is not None:
            client.close()
        if server is not None:
            server.close()


if __name__ == "__main__":
    # SIGTERM (kill, docker stop) ends the script as Ctrl-C does, so the cleanup in main() runs
    # and an embedded redis-server does not outlive it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
