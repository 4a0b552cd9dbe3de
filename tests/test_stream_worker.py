"""StreamWorker (gpuq_driver.streams.worker) + BatchProcessor against real redis-server processes:
round trips each exactly once, a SIGKILLed consumer's entries reclaimed, lost, undecodable and
oversized entries, argument checks.

Tests that talk to Redis take the ``redis_server`` / ``redis_client`` fixtures (tests/conftest.py):
each runs once per Redis version found, and skips with the reason where there is none (fails
instead under GPUQ_REQUIRE_REDIS=1).  GPU variants take the ``gpu`` fixture and skip without a GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpuq_driver import ConfigError
from gpuq_driver.errors import BrokerError
from gpuq_driver.streams import (
    BatchProcessor,
    GpuBridge,
    RedisServer,
    StreamConsumer,
    StreamProducer,
    StreamWorker,
    encode_frame,
)
from gpuq_driver.streams.wire import frames

from .streams_helpers import all_results, assert_exactly_once, expected_results, make_payloads, pel_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("frame", [1, 16])
@pytest.mark.parametrize("proc_backend", ["numpy", "cuda"])
def test_round_trip_10k_messages_each_exactly_once(request, redis_client, proc_backend, frame):
    if proc_backend == "cuda":
        request.getfixturevalue("gpu")
    n = 10_000
    payloads = make_payloads(n, seed=frame)
    producer = StreamProducer(redis_client, "s", frame=frame)
    ids = producer.send_many(payloads)
    assert len(ids) == n // frame == redis_client.xlen("s")
    assert producer.sent_messages == n and producer.sent_entries == len(ids)
    consumer = StreamConsumer(redis_client, "s", "g", "w1", block_ms=100)
    with BatchProcessor(slot_bytes=256, max_batch=4096, backend=proc_backend) as proc:
        assert proc.backend == proc_backend
        stats = StreamWorker(consumer, proc).run(max_messages=n, idle_exit_s=5)
        assert proc.messages == n
    assert (stats.messages, stats.entries, stats.failed, stats.duplicates, stats.lost) == (n, len(ids), 0, 0, 0)
    assert consumer.pending() == 0 and consumer.published == len(ids)
    assert_exactly_once(all_results(redis_client, "s:results"), expected_results(ids, payloads, frame))


VICTIM = r"""
import sys, time
from gpuq_driver.streams import StreamConsumer, connect
url, count = sys.argv[1], int(sys.argv[2])
consumer = StreamConsumer(connect(url), "s", "g", "victim", count=count)
entries = consumer.read(block_ms=0)
print("ready", len(entries), flush=True)
time.sleep(120)
"""


def start_victim(url: str, count: int) -> tuple[subprocess.Popen, int]:
    """A consumer in a separate process (no fork) that reads ``count`` entries, holds them
    pending, and sleeps; returns once it has read them."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, url, str(count)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    guard = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
    guard.start()
    try:
        line = proc.stdout.readline()
    finally:
        guard.cancel()
    if not line.startswith("ready"):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the victim consumer did not start: {line!r}\n{err}")
    return proc, int(line.split()[1])


@pytest.mark.parametrize("frame", [1, 8])
def test_sigkilled_consumer_entries_reclaimed_and_published_once(redis_server, redis_client, frame):
    n = 2000
    payloads = make_payloads(n, seed=20 + frame)
    ids = StreamProducer(redis_client, "s", frame=frame).send_many(payloads)
    k = len(ids) // 3
    victim, got = start_victim(redis_server.url, k)
    try:
        assert got == k
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.communicate()
    info = redis_client.xpending("s", "g")
    assert info["pending"] == k and info["consumers"] == [{"name": b"victim", "pending": k}]
    assert pel_ids(redis_client) == ids[:k]  # held by the dead consumer, not acked

    consumer = StreamConsumer(redis_client, "s", "g", "survivor", claim_idle_ms=100, block_ms=50)
    with BatchProcessor(slot_bytes=256, backend="numpy") as proc:
        stats = StreamWorker(consumer, proc, reclaim_every_s=0.05).run(max_messages=n, idle_exit_s=5)
    assert stats.reclaimed == k, "the dead consumer's entries were not taken over"
    assert (stats.messages, stats.entries, stats.duplicates, stats.failed) == (n, len(ids), 0, 0)
    assert consumer.pending() == 0
    assert redis_client.xpending("s", "g")["pending"] == 0
    results = all_results(redis_client, "s:results")
    assert len(results) == n
    assert_exactly_once(results, expected_results(ids, payloads, frame))


def test_worker_counts_lost_entries_and_processes_the_rest(redis_client):
    ids = StreamProducer(redis_client, "s").send_many([b"m%d" % i for i in range(30)])
    dead = StreamConsumer(redis_client, "s", "g", "dead", count=20)
    assert len(dead.read(block_ms=0)) == 20
    redis_client.xtrim("s", maxlen=20, approximate=False)  # deletes 10 pending entries
    consumer = StreamConsumer(redis_client, "s", "g", "w", claim_idle_ms=0, block_ms=50)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        stats = StreamWorker(consumer, proc, reclaim_every_s=0.0).run(max_messages=20, idle_exit_s=3)
    assert stats.lost == 10 and consumer.lost == ids[:10]
    assert stats.messages == 20 and stats.reclaimed == 10
    assert consumer.pending() == 0
    assert_exactly_once(
        all_results(redis_client, "s:results"), {(eid, 0): b"m%d" % i for i, eid in enumerate(ids) if i >= 10}
    )


def test_undecodable_entries_are_completed_as_failed_and_acked(redis_client):
    good = redis_client.xadd("s", {b"d": b"hi"})
    foreign = redis_client.xadd("s", {b"x": b"y"})
    corrupt = redis_client.xadd("s", {b"f": b"\x05\x00\x00\x00"})
    framed = redis_client.xadd("s", {b"f": encode_frame([b"a", b"bc"])})
    inspect = StreamConsumer(redis_client, "s", "inspect", "i", block_ms=0)  # another group: reads only
    errors = {e.id: e.error for e in inspect.read()}
    assert errors[good] is None and errors[framed] is None
    assert "undecodable" in errors[foreign] and "undecodable" in errors[corrupt]
    consumer = StreamConsumer(redis_client, "s", "g", "w", block_ms=0)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        worker = StreamWorker(consumer, proc)
        done = worker.step()
    assert done == 3 and worker.stats.failed == 2 and worker.stats.entries == 4
    assert consumer.pending() == 0, "an undecodable entry must not stay pending"
    ((_, fields),) = redis_client.xrange("s:results")  # one complete() call: one result entry
    published = dict(zip(fields[b"ids"].split(b","), frames(fields[b"r"])))
    assert set(published) == {good, foreign, corrupt, framed} and b"dup" not in fields
    assert len(published[foreign][0]) == 0 and len(published[corrupt][0]) == 0
    assert sorted(all_results(redis_client, "s:results")) == sorted(
        [((good, 0), b"hi"), ((framed, 0), b"a"), ((framed, 1), b"bc")]
    )


def test_foreign_message_frame_with_failed_length_is_a_failed_entry(redis_client):
    """A message frame carrying the FAILED length (only result frames may) written by another
    producer: the worker fails that entry and publishes the others, it does not crash."""
    good1 = redis_client.xadd("s", {b"d": b"before"})
    bad = redis_client.xadd("s", {b"f": encode_frame([b"ab", None, b"c"])})
    good2 = redis_client.xadd("s", {b"f": encode_frame([b"p", b"qr"])})
    consumer = StreamConsumer(redis_client, "s", "g", "w", block_ms=0)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        stats = StreamWorker(consumer, proc).run(max_messages=3, idle_exit_s=1)
    assert stats.entries == 3 and stats.failed == 1 and stats.duplicates == 0
    assert consumer.pending() == 0, "the bad entry must not stay pending"
    assert sorted(all_results(redis_client, "s:results")) == sorted(
        [((good1, 0), b"before"), ((good2, 0), b"p"), ((good2, 1), b"qr")]
    )
    ((_, fields),) = redis_client.xrange("s:results")
    assert bad in fields[b"ids"].split(b",")  # completed (acked) with no results


def test_worker_fails_oversized_message_and_processes_the_rest(redis_client):
    """frame=4 with max_batch=5: entries are split over batches; one message is larger than a
    slot and gets a failed (None) result, every other one its echo."""
    frame, n = 4, 103
    payloads = make_payloads(n, seed=7, max_len=40)
    payloads[42] = b"z" * 65
    ids = StreamProducer(redis_client, "s", frame=frame).send_many(payloads)
    consumer = StreamConsumer(redis_client, "s", "g", "w", block_ms=50)
    with BatchProcessor(slot_bytes=64, max_batch=5, backend="numpy") as proc:
        stats = StreamWorker(consumer, proc).run(max_messages=n, idle_exit_s=3)
    assert stats.messages == n and stats.failed == 1 and stats.entries == len(ids)
    assert consumer.pending() == 0
    expected = expected_results(ids, payloads, frame)
    expected[(ids[42 // frame], 42 % frame)] = None
    assert_exactly_once(all_results(redis_client, "s:results"), expected)


def test_bridge_and_worker_arguments_are_checked(redis_client):
    from gpuq_driver import GpuQueue, QueueConfig

    consumer = StreamConsumer(redis_client, "s", "g", "c")
    with GpuQueue(QueueConfig(backend="sim", capacity=64)) as q:
        for kwargs, field in (
            ({"publish_batch": 0}, "publish_batch"),
            ({"publish_batch": "x"}, "publish_batch"),
            ({"reclaim_every_s": -1}, "reclaim_every_s"),
        ):
            with pytest.raises(ConfigError, match=f"{field}="):
                GpuBridge(consumer, q, **kwargs)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        for value in (-1, -0.5, "1"):
            with pytest.raises(ConfigError, match="reclaim_every_s="):
                StreamWorker(consumer, proc, reclaim_every_s=value)
    with pytest.raises(ConfigError, match="threads_per_block="):
        BatchProcessor(threads_per_block="64", backend="numpy")


def test_streams_arguments_are_checked_up_front(redis_client):
    """Issue 10 items 2-3: library errors naming the argument, before anything reaches Redis."""
    from gpuq_driver.streams import StreamWorker, connect

    with pytest.raises(ConfigError, match="url=None"):
        connect(None)
    with pytest.raises(BrokerError, match="no such executable"):
        RedisServer("/nonexistent/redis-server")
    with pytest.raises(ConfigError, match="client must be a redis-py client"):
        StreamProducer(None, "s")
    with pytest.raises(ConfigError, match="stream=None"):
        StreamProducer(redis_client, None)
    for args, name in ((("in", "", "w"), "group"), (("in", "g", None), "consumer"), ((b"", "g", "w"), "stream")):
        with pytest.raises(ConfigError, match=f"{name}="):
            StreamConsumer(redis_client, *args)
    consumer = StreamConsumer(redis_client, "in", "g", "w")
    with pytest.raises(ConfigError, match="queue must be a GpuQueue"):
        GpuBridge(consumer, None)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        with pytest.raises(ConfigError, match="consumer must be a StreamConsumer"):
            StreamWorker(None, proc)
        worker = StreamWorker(consumer, proc)
        for kw, name in (({"max_messages": -1}, "max_messages"), ({"idle_exit_s": -1}, "idle_exit_s")):
            with pytest.raises(ConfigError, match=name):
                worker.run(**kw)
    assert redis_client.exists("s") == 0
