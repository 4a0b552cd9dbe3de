#!/usr/bin/env python3
"""Produce numbered test messages into a Redis stream, for the Track A consumers.

Every payload starts with its sequence number (``b"0000000042:"``) followed by filler bytes
that depend on that number, so a consumer can check each result against the message that went
in (examples/redis_consumer.py does).  Prints a progress line about every second and, at the
end, how many messages and entries were added and at what rate.

    python examples/redis_producer.py --redis-url redis://localhost:6379/0    # or set REDIS_URL
    python examples/redis_producer.py --serve       # embedded redis-server, kept running for a consumer
    python examples/redis_producer.py --messages 1e6 --size 256 --frame 64 --rate 200000

Without --redis-url (or REDIS_URL) it starts an embedded redis-server on a free port and prints
its URL.  That server stops when this script exits; --serve keeps it (and the stream) alive until
Ctrl-C, so examples/redis_consumer.py can be pointed at the printed URL from another terminal;
if that server dies meanwhile, it says so and exits 3.

Exit codes: 0 done; 2 bad arguments, or redis-py not installed; 3 Redis unreachable or unusable;
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

import numpy as np

from gpuq_driver.errors import BrokerError, ConfigError, check_int
from gpuq_driver.streams import RedisServer, StreamProducer, connect

HEADER = 11  # bytes of b"%010d:" at the start of every payload: the sequence number
_POOL_SPAN = 1 << 20  # filler comes from a window of this fixed random pool, chosen by the number
_POOL = np.random.default_rng(20250101).integers(0, 256, 2 * _POOL_SPAN, dtype=np.uint8).tobytes()
MAX_SIZE = _POOL_SPAN + HEADER


def make_payload(seq: int, size: int) -> bytes:
    """Message number ``seq``, ``size`` bytes: ``b"%010d:" % seq`` then filler chosen by ``seq``."""
    off = (seq * 2654435761) % _POOL_SPAN
    return b"%010d:" % seq + _POOL[off : off + size - HEADER]


def payload_seq(data) -> int | None:
    """The sequence number of a payload made by make_payload, or None if it is not one."""
    head = bytes(data[:HEADER])
    if len(data) < HEADER or head[-1:] != b":" or not head[:-1].isdigit():
        return None
    seq = int(head[:-1])
    return seq if bytes(data) == make_payload(seq, len(data)) else None


def status(text: str, final: bool = False) -> None:
    """A progress line: rewritten in place on a terminal, one line per call otherwise."""
    if sys.stdout.isatty():
        sys.stdout.write("\r" + text.ljust(100) + ("\n" if final else ""))
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stop_on_signal():
    """While inside, Ctrl-C (SIGINT) and SIGTERM set the Event it yields, for the loop to check,
    rather than raise KeyboardInterrupt wherever Python happens to be: inside a redis-py call
    hiredis can crash on it (its pack_command does not check an int's repr, which fails when a
    signal is pending).  A second one raises KeyboardInterrupt at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def produce(producer: StreamProducer, n: int, size: int, label: str = "produced") -> float:
    """Send messages 0 .. n-1 of ``size`` bytes through ``producer``, printing progress about
    every second; returns the seconds it took.  Ctrl-C stops it between round trips
    (KeyboardInterrupt)."""
    # One send_many call sends `chunk` messages in pipelined round trips.  Under a rate limit the
    # chunk is ~0.1 s worth of messages, so the progress line keeps moving.
    chunk = producer.frame * producer.pipeline
    if producer.rate_limit:
        chunk = max(producer.frame, min(chunk, int(producer.rate_limit / 10) // producer.frame * producer.frame))
    t0 = last = time.perf_counter()
    with stop_on_signal() as stop:
        for start in range(0, n, chunk):
            if stop.is_set():
                break
            producer.send_many([make_payload(seq, size) for seq in range(start, min(n, start + chunk))])
            now = time.perf_counter()
            if now - last >= 1.0:
                last = now
                status(
                    f"{label} {producer.sent_messages:,} / {n:,} messages ({producer.sent_entries:,} entries), "
                    f"{producer.sent_messages / (now - t0):,.0f} msg/s"
                )
    elapsed = time.perf_counter() - t0
    if sys.stdout.isatty() and elapsed >= 1.0:
        sys.stdout.write("\n")  # end the in-place progress line
    if stop.is_set():
        raise KeyboardInterrupt
    return elapsed


def check_ints(ap: argparse.ArgumentParser, checks) -> None:
    """check_int on each (flag, value, lo, hi), named by its flag; ap.error (exit 2) on the first
    out of range."""
    for flag, value, lo, hi in checks:
        try:
            check_int(flag, value, lo, hi)
        except ConfigError as exc:
            ap.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1])
    ap.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis to write to (default: $REDIS_URL; neither: start an embedded redis-server)",
    )
    ap.add_argument(
        "--serve", action="store_true", help="with the embedded server: keep it running after producing, until Ctrl-C"
    )
    ap.add_argument("--stream", default="gpuq:in", help="stream key (default gpuq:in)")
    ap.add_argument("--messages", type=float, default=100_000, help="messages to send (default 1e5)")
    ap.add_argument("--size", type=int, default=64, help=f"payload bytes, {HEADER} .. {MAX_SIZE} (default 64)")
    ap.add_argument("--frame", type=int, default=1, help="messages per stream entry (default 1: plain entries)")
    ap.add_argument(
        "--rate", type=float, default=None, help="messages/s ceiling (default: as fast as Redis takes them)"
    )
    ap.add_argument(
        "--maxlen", type=int, default=1_000_000, help="approximate stream length cap, entries (default 1e6)"
    )
    args = ap.parse_args(argv)
    # Every argument is checked here, before a server starts (the limits StreamProducer sets).
    if not 1 <= args.messages <= 1e12 or args.messages % 1:  # also refuses nan and inf
        ap.error(f"--messages {args.messages:g}: send a whole number of 1 to 1,000,000,000,000 messages")
    n = int(args.messages)
    if not args.stream:
        ap.error("--stream '': a stream key must not be empty")
    check_ints(ap, [("--frame", args.frame, 1, None), ("--maxlen", args.maxlen, 1, None)])
    if args.rate is not None and not 0 < args.rate < float("inf"):
        ap.error(f"--rate {args.rate:g}: must be a number of messages/s > 0")
    if not HEADER <= args.size <= MAX_SIZE:
        ap.error(f"--size {args.size}: payloads are {HEADER} .. {MAX_SIZE} bytes (the first {HEADER} hold the number)")

    server = client = producer = None
    try:
        # 1. Where Redis is: the given URL, or a throwaway redis-server of our own.
        if args.redis_url:
            url = args.redis_url
        else:
            server = RedisServer()
            url = server.url
            print(
                f"started an embedded redis-server {server.version} at {url}"
                + ("" if args.serve else " (it stops when this script exits; --serve keeps it)")
            )
        client = connect(url)

        # 2. Produce, XADD ... MAXLEN ~ maxlen, pipelined.
        producer = StreamProducer(client, args.stream, maxlen=args.maxlen, frame=args.frame, rate_limit=args.rate)
        elapsed = produce(producer, n, args.size)
        print(
            f"produced {producer.sent_messages:,} messages of {args.size} B in {producer.sent_entries:,} entries "
            f"to {args.stream} in {elapsed:.2f} s: {producer.sent_messages / elapsed:,.0f} msg/s; "
            f"stream length now {client.xlen(args.stream):,} entries"
        )

        # 3. Optionally keep the embedded server (and so the stream) alive for a consumer.
        if args.serve and server is not None:
            print(
                f"serving {url} until Ctrl-C; in another terminal:\n"
                f"    python examples/redis_consumer.py --redis-url {url} --stream {args.stream}",
                flush=True,
            )
            try:
                while not server.closed:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                print("stopping the embedded redis-server")
            else:  # it died under us (killed, out of memory): the stream went with it
                print(
                    f"redis_producer: the embedded redis-server at {url} exited (status {server.exit_status}); "
                    f"the stream {args.stream} is gone",
                    file=sys.stderr,
                )
                return 3
        elif args.serve:
            print("--serve: nothing to keep running, Redis at --redis-url is not ours")
        return 0
    except ConfigError as exc:  # a malformed --redis-url
        print(f"redis_producer: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:  # BrokerUnavailable (unreachable, connection lost) or no redis-server binary
        print(f"redis_producer: {exc}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        print("redis_producer: needs redis-py: pip install -e '.[redis]' (from a checkout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sent = f" after {producer.sent_messages:,} messages" if producer is not None else ""
        print(f"\ninterrupted{sent}", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.close()


if __name__ == "__main__":
    # SIGTERM (kill, docker stop) ends the script as Ctrl-C does, so the cleanup in main() runs
    # and an embedded redis-server does not outlive it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
