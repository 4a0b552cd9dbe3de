"""Track A (gpuq_driver.streams) against real redis-server processes: no mocks, no fakes.

Tests that talk to Redis take the ``redis_server`` / ``redis_client`` fixtures (tests/conftest.py):
each runs once per Redis version found (6.2 and 7 answer XAUTOCLAIM differently), and skips with
the reason where there is none (fails instead under GPUQ_REQUIRE_REDIS=1).  GPU variants take
the ``gpu`` fixture or the ``backend`` fixture's "cuda" value and skip without a GPU.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpuq_driver import ConfigError, GpuqError, GpuQueue, PayloadError, QueueConfig
from gpuq_driver.errors import BrokerError, BrokerUnavailable
from gpuq_driver.streams import (BatchProcessor, GpuBridge, RedisServer, StreamConsumer, StreamProducer,
                                 StreamWorker, connect, decode_frame, encode_frame, read_results)
from gpuq_driver.streams.wire import FAILED, frames

ROOT = Path(__file__).resolve().parent.parent


# --- helpers ----------------------------------------------------------------------------------

def make_payloads(n: int, seed: int = 0, max_len: int = 200) -> list[bytes]:
    """n distinct payloads of random length (every 997th one empty)."""
    rng = random.Random(seed)
    return [b"" if i % 997 == 0 else b"%06d:" % i + rng.randbytes(rng.randint(0, max_len)) for i in range(n)]


def expected_results(ids: list[bytes], payloads: list, frame: int) -> dict:
    """{(entry id, index): payload} for payloads sent with StreamProducer(frame=frame)."""
    assert len(ids) == -(-len(payloads) // frame)
    return {(eid, i): payloads[j * frame + i] for j, eid in enumerate(ids)
            for i in range(min(frame, len(payloads) - j * frame))}


def all_results(client, result_stream: str) -> list:
    """Every (msg_id, result) in ``result_stream``, read with read_results until it is exhausted."""
    after, out = "0", []
    while True:
        last, got = read_results(client, result_stream, after, count=300)
        out += got
        if last == after:
            return out
        after = last


def assert_exactly_once(results: list, expected: dict) -> None:
    ids = [mid for mid, _ in results]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} results published twice"
    assert set(ids) == set(expected), (f"missing {len(set(expected) - set(ids))}, "
                                       f"unexpected {len(set(ids) - set(expected))}")
    wrong = [mid for mid, r in results if r != expected[mid]]
    assert wrong == [], f"{len(wrong)} wrong results, first {wrong[:3]}"


def pel_ids(client, stream: str = "s", group: str = "g") -> list[bytes]:
    return [p["message_id"] for p in client.xpending_range(stream, group, "-", "+", 100_000)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. round trip: producer -> consumer group -> BatchProcessor -> result stream --------------

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


# --- 2. a consumer killed with SIGKILL; two consumers completing the same entry ----------------

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
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, url, str(count)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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


def test_entry_completed_by_two_consumers_is_published_once(redis_client):
    """A was slow, not dead: B reclaimed its entries and completed them; A's late complete()
    publishes nothing and counts duplicates.  With a partial overlap each entry is published by
    whichever consumer completed it first."""
    frame = 4
    payloads = make_payloads(400, seed=3, max_len=50)
    ids = StreamProducer(redis_client, "s", frame=frame).send_many(payloads)
    a = StreamConsumer(redis_client, "s", "g", "a")
    b = StreamConsumer(redis_client, "s", "g", "b")
    got_a = a.read(block_ms=0)
    assert [e.id for e in got_a] == ids
    got_b = b.reclaim(min_idle_ms=0)
    assert [e.id for e in got_b.entries] == ids and got_b.lost == []
    assert redis_client.xpending("s", "g")["consumers"] == [{"name": b"b", "pending": len(ids)}]

    def results_of(entries, tag):
        return [[tag + bytes(p) for p in e.payloads] for e in entries]

    half = len(ids) // 2
    # A completes the first half (it still may: XACK does not check the owner) ...
    assert a.complete(got_a[:half], results_of(got_a[:half], b"A")) == half
    # ... B everything: only the second half is still pending, only it is published
    assert b.complete(got_b.entries, results_of(got_b.entries, b"B")) == len(ids) - half
    assert b.duplicates == half and b.published == len(ids) - half
    # ... and A, late, the second half: nothing published
    assert a.complete(got_a[half:], results_of(got_a[half:], b"A")) == 0
    assert a.duplicates == len(ids) - half and a.published == half
    assert redis_client.xpending("s", "g")["pending"] == 0

    expected = expected_results(ids, payloads, frame)
    first_half = set(ids[:half])
    expected = {mid: (b"A" if mid[0] in first_half else b"B") + p for mid, p in expected.items()}
    assert_exactly_once(all_results(redis_client, "s:results"), expected)


# --- 3. MAXLEN trimming deletes pending entries: reported lost, removed from the PEL ------------

def test_xtrim_deleted_pending_entries_reported_lost(redis_client):
    ids = StreamProducer(redis_client, "s").send_many([b"m%d" % i for i in range(40)])
    a = StreamConsumer(redis_client, "s", "g", "a", count=100)
    assert len(a.read(block_ms=0)) == 40
    assert redis_client.xtrim("s", maxlen=15, approximate=False) == 25
    deleted, kept = ids[:25], ids[25:]
    assert [eid for eid, _ in redis_client.xrange("s")] == kept
    assert pel_ids(redis_client) == ids  # trimming does not touch the PEL

    b = StreamConsumer(redis_client, "s", "g", "b")
    got = b.reclaim(min_idle_ms=0)
    assert got.lost == deleted and b.lost == deleted
    assert [e.id for e in got.entries] == kept
    assert [bytes(e.payloads[0]) for e in got.entries] == [b"m%d" % i for i in range(25, 40)]
    assert pel_ids(redis_client) == kept
    assert redis_client.xpending("s", "g")["consumers"] == [{"name": b"b", "pending": 15}]
    assert b.reclaim(min_idle_ms=0).lost == []  # reported once


def test_reclaim_pages_through_deleted_entries(redis_client):
    """reclaim(count=4) with 25 deleted entries ahead of the live ones: every deleted id is
    reported (XAUTOCLAIM's COUNT covers deleted entries too), then 4 live entries are claimed."""
    ids = StreamProducer(redis_client, "s").send_many([b"m%d" % i for i in range(40)])
    a = StreamConsumer(redis_client, "s", "g", "a", count=100)
    assert len(a.read(block_ms=0)) == 40
    redis_client.xtrim("s", maxlen=15, approximate=False)
    got = a.reclaim(min_idle_ms=0, count=4)  # the same consumer that read them
    assert got.lost == ids[:25]
    assert [e.id for e in got.entries] == ids[25:29]
    assert pel_ids(redis_client) == ids[25:]


def test_producer_maxlen_trimming_reports_exactly_what_redis_deleted(redis_client):
    """StreamProducer(maxlen=300) trims approximately (whole nodes): compare with XRANGE."""
    a = StreamConsumer(redis_client, "s", "g", "a", count=10_000)
    producer = StreamProducer(redis_client, "s", maxlen=300, pipeline=50)
    sent = []
    for r in range(5):  # each round read (pending) before the next round trims
        sent += producer.send_many([b"r%d-%d" % (r, i) for i in range(250)])
        assert len(a.read(block_ms=0)) == 250
    assert redis_client.xlen("s") >= 300  # "~" keeps at least maxlen
    present = {eid for eid, _ in redis_client.xrange("s")}
    deleted = [eid for eid in sent if eid not in present]
    kept = [eid for eid in sent if eid in present]
    assert deleted and kept, "expected trimming to delete some pending entries and keep others"
    assert pel_ids(redis_client) == sent

    got = a.reclaim(min_idle_ms=0, count=10_000)
    assert got.lost == deleted
    assert [e.id for e in got.entries] == kept
    assert pel_ids(redis_client) == kept


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
    assert_exactly_once(all_results(redis_client, "s:results"),
                        {(eid, 0): b"m%d" % i for i, eid in enumerate(ids) if i >= 10})


# --- 4. XREADGROUP BLOCK longer than the socket timeout -----------------------------------------

def test_block_longer_than_socket_timeout_returns_empty(redis_server, redis_client, redis_py):
    client = connect(redis_server.url, socket_timeout_s=0.5)
    try:
        # a single XREADGROUP BLOCK longer than the socket timeout does trip it ...
        client.xgroup_create("raw", "g", id="0", mkstream=True)
        with pytest.raises(redis_py.TimeoutError):
            client.xreadgroup("g", "c", {"raw": ">"}, block=1500)
        # ... StreamConsumer.read cuts the wait into shorter ones
        consumer = StreamConsumer(client, "s", "g", "c")
        t0 = time.monotonic()
        got = consumer.read(block_ms=1500)
        took = time.monotonic() - t0
        assert got == []
        assert 1.4 <= took < 3.0, took

        def add_later():
            time.sleep(0.8)
            redis_client.xadd("s", {b"d": b"late"})

        adder = threading.Thread(target=add_later)
        t0 = time.monotonic()
        adder.start()
        got = consumer.read(block_ms=3000)
        took = time.monotonic() - t0
        adder.join()
        assert [bytes(p) for e in got for p in e.payloads] == [b"late"]
        assert 0.7 <= took < 2.0, took
    finally:
        client.close()


# --- 5. server down, bad URL --------------------------------------------------------------------

def test_unreachable_server_names_the_url_without_password(redis_py):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with pytest.raises(BrokerUnavailable, match=re.escape(url)) as ei:
        connect(url)
    assert ei.value.url == url and ei.value.sent_ids == []
    for secret_url, shown in ((f"redis://:s3cret-pw@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0"),
                              (f"redis://bob:s3cret-pw@127.0.0.1:{port}/0", f"redis://bob:***@127.0.0.1:{port}/0")):
        with pytest.raises(BrokerUnavailable) as ei:
            connect(secret_url)
        assert "s3cret-pw" not in str(ei.value) and "s3cret-pw" not in repr(ei.value.args)
        assert shown in str(ei.value) and ei.value.url == shown


def test_wrong_password_is_refused_login_without_password(redis_server):
    """The server is up and says no: BrokerError naming the login, not 'unreachable'."""
    url = redis_server.url.replace("redis://", "redis://bob:s3cret-pw@")
    with pytest.raises(BrokerError) as ei:
        connect(url)
    assert not isinstance(ei.value, BrokerUnavailable) and "refused the login" in str(ei.value)
    assert "s3cret-pw" not in str(ei.value) and "bob:***@" in str(ei.value)


def test_malformed_url_is_config_error(redis_py):
    with pytest.raises(ConfigError, match="http://x"):
        connect("http://x")
    with pytest.raises(ConfigError) as ei:
        connect("http://bob:s3cret-pw@x")
    assert "s3cret-pw" not in str(ei.value)
    with pytest.raises(ConfigError, match="decode_responses"):
        connect("redis://127.0.0.1:1/0", decode_responses=True)


def test_server_stopped_mid_send_reports_acknowledged_ids(redis_server):
    """The producer sends 100 entries per round trip, paced (one round trip per 50 ms); the server
    is paused for writes, its stream read, then stopped.  BrokerUnavailable.sent_ids must be
    exactly the ids Redis had acknowledged: a prefix of what it stored, whole round trips."""
    server = RedisServer(redis_server.executable)
    try:
        client, watcher = connect(server.url), connect(server.url)
        producer = StreamProducer(client, "s", pipeline=100, rate_limit=2000)
        stored = []

        def stop():
            time.sleep(0.22)
            watcher.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # no XADD runs after this
            stored.extend(eid for eid, _ in watcher.xrange("s"))
            server.close()

        stopper = threading.Thread(target=stop)
        stopper.start()
        try:
            with pytest.raises(BrokerUnavailable) as ei:
                producer.send_many(make_payloads(1000, seed=5, max_len=20))
        finally:
            stopper.join()
    finally:
        server.close()
    sent = ei.value.sent_ids
    assert server.url in str(ei.value) and ei.value.url == server.url
    assert 0 < len(sent) < 1000 and len(sent) % 100 == 0
    assert sent == stored[:len(sent)] and len(stored) - len(sent) < 100
    assert producer.sent_messages == producer.sent_entries == len(sent)


def test_consumer_and_producer_on_dead_server_raise_broker_unavailable(redis_server):
    server = RedisServer(redis_server.executable)
    try:
        client = connect(server.url)
        producer = StreamProducer(client, "s")
        producer.send_many([b"a", b"b"])
        consumer = StreamConsumer(client, "s", "g", "c")
        entries = consumer.read(block_ms=0)
        assert len(entries) == 2
    finally:
        server.close()
    assert server.closed
    calls = {
        "read": lambda: consumer.read(block_ms=0),
        "read blocking": lambda: consumer.read(block_ms=200),
        "complete": lambda: consumer.complete(entries, [[b"a"], [b"b"]]),
        "reclaim": lambda: consumer.reclaim(min_idle_ms=0),
        "pending": consumer.pending,
        "send": lambda: producer.send(b"c"),
        "send_many": lambda: producer.send_many([b"c", b"d"]),
    }
    for name, call in calls.items():
        with pytest.raises(BrokerUnavailable) as ei:
            call()
        assert server.url in str(ei.value), name
        assert ei.value.sent_ids == [], name
    assert consumer.published == 0 and consumer.duplicates == 0


def test_redis_server_lifecycle(redis_server):
    with RedisServer(redis_server.executable) as server:
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", server.url)
        assert server.version == redis_server.version and not server.closed
        assert connect(server.url).ping()
        assert server.url in repr(server)
    assert server.closed and "closed" in repr(server)
    server.close()  # twice is fine
    with pytest.raises(BrokerUnavailable):
        connect(server.url, socket_timeout_s=1.0)
    with pytest.raises(BrokerError, match="exited with status 1 before answering PING|No such file|not found|Permission|Errno"):
        RedisServer("/bin/false", startup_timeout_s=2.0)


# --- 6. units: wire format, config errors, groups, bad entries, pacing, oversized messages ------

def test_frame_round_trip():
    items = [b"abc", None, b"", memoryview(b"xyz"), bytearray(b"q" * 1000), None, bytes(range(256))]
    frame = encode_frame(items)
    assert len(frame) == 4 + 4 * len(items) + 3 + 3 + 1000 + 256
    out = decode_frame(frame)
    assert [None if o is None else bytes(o) for o in out] == [None if i is None else bytes(i) for i in items]
    assert all(o is None or o.readonly for o in decode_frame(frame))
    assert np.frombuffer(frame, "<u4", 1 + len(items))[1:].tolist() == [3, FAILED, 0, 3, 1000, FAILED, 256]
    assert encode_frame([]) == b"\0\0\0\0" and decode_frame(b"\0\0\0\0") == []
    assert decode_frame(encode_frame([None, None])) == [None, None]
    assert [bytes(o) for o in decode_frame(encode_frame([b""] * 5))] == [b""] * 5
    rng = random.Random(9)
    many = [rng.randbytes(rng.randint(0, 40)) if rng.random() > 0.1 else None for _ in range(3000)]
    assert [None if o is None else bytes(o) for o in decode_frame(bytearray(encode_frame(many)))] == many


@pytest.mark.parametrize("frame, why", [
    (b"", "shorter than its 4-byte count"),
    (b"\x01\x00", "shorter than its 4-byte count"),
    (b"\x03\x00\x00\x00" + b"\x00" * 4, "says 3 items"),
    (encode_frame([b"abc", b"de"])[:-1], "add up to"),
    (encode_frame([b"abc", b"de"]) + b"!", "add up to"),
    (encode_frame([]) + b"garbage", "add up to"),
    (encode_frame([None]) + b"x", "add up to"),
    (b"\x01\x00\x00\x00\xfe\xff\xff\xff" + b"x" * 10, "add up to"),
])
def test_decode_frame_rejects_corrupted_frames(frame, why):
    with pytest.raises(ValueError, match=why):
        decode_frame(frame)


@pytest.mark.parametrize("kwargs, field", [
    ({"maxlen": 0}, "maxlen"), ({"maxlen": 1.5}, "maxlen"), ({"frame": 0}, "frame"), ({"frame": True}, "frame"),
    ({"pipeline": 0}, "pipeline"), ({"rate_limit": 0}, "rate_limit"), ({"rate_limit": -5.0}, "rate_limit"),
])
def test_producer_config_errors_name_the_field(redis_client, kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        StreamProducer(redis_client, "s", **kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"count": 0}, "count"), ({"count": "10"}, "count"), ({"block_ms": -1}, "block_ms"),
    ({"claim_idle_ms": -1}, "claim_idle_ms"), ({"claim_idle_ms": 1.0}, "claim_idle_ms"),
    ({"result_maxlen": 0}, "result_maxlen"),
])
def test_consumer_config_errors_name_the_field(redis_client, kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        StreamConsumer(redis_client, "s", "g", "c", **kwargs)
    assert redis_client.exists("s") == 0  # refused before touching Redis


def test_consumer_refuses_decoding_client(redis_server, redis_py):
    client = redis_py.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ConfigError, match="decode_responses"):
        StreamConsumer(client, "s", "g", "c")
    client.close()


@pytest.mark.parametrize("kwargs, field", [
    ({"slot_bytes": 17}, "slot_bytes"), ({"slot_bytes": 0}, "slot_bytes"), ({"slot_bytes": 2 << 20}, "slot_bytes"),
    ({"max_batch": 0}, "max_batch"), ({"max_batch": True}, "max_batch"), ({"threads_per_block": 48}, "threads_per_block"),
    ({"backend": "opencl"}, "backend"), ({"plugin": "no-such-plugin", "backend": "numpy"}, "plugin"),
])
def test_batch_processor_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        BatchProcessor(**kwargs)


def test_ensure_group_is_idempotent(redis_client):
    StreamProducer(redis_client, "s").send_many([b"1", b"2", b"3"])
    a = StreamConsumer(redis_client, "s", "g", "a", count=2)
    assert [bytes(e.payloads[0]) for e in a.read(block_ms=0)] == [b"1", b"2"]
    assert a.ensure_group() is False
    b = StreamConsumer(redis_client, "s", "g", "b")  # an existing group is kept, not reset
    assert [bytes(e.payloads[0]) for e in b.read(block_ms=0)] == [b"3"]
    (group,) = redis_client.xinfo_groups("s")
    assert group["pending"] == 3 and group["consumers"] == 2
    # a missing stream is created with the group (MKSTREAM); a destroyed group is created again
    c = StreamConsumer(redis_client, "fresh", "g2", "c", start_id="$")
    assert redis_client.exists("fresh") == 1 and c.ensure_group() is False
    assert redis_client.xgroup_destroy("fresh", "g2") == 1
    assert c.ensure_group() is True and c.ensure_group() is False


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
    (_, fields), = redis_client.xrange("s:results")  # one complete() call: one result entry
    published = dict(zip(fields[b"ids"].split(b","), frames(fields[b"r"])))
    assert set(published) == {good, foreign, corrupt, framed} and b"dup" not in fields
    assert len(published[foreign][0]) == 0 and len(published[corrupt][0]) == 0
    assert sorted(all_results(redis_client, "s:results")) == sorted(
        [((good, 0), b"hi"), ((framed, 0), b"a"), ((framed, 1), b"bc")])


def test_rate_limit_paces_the_producer(redis_client):
    producer = StreamProducer(redis_client, "s", pipeline=100, rate_limit=10_000)
    t0 = time.monotonic()
    ids = producer.send_many([b"x"] * 2000)
    took = time.monotonic() - t0
    assert len(ids) == 2000 and 0.18 <= took < 2.0, took
    # the limit counts messages, not entries: 2000 messages in frames of 20 are paced the same
    framed = StreamProducer(redis_client, "f", pipeline=10, frame=20, rate_limit=10_000)
    t0 = time.monotonic()
    ids = framed.send_many([b"x"] * 2000)
    took = time.monotonic() - t0
    assert len(ids) == 100 and 0.18 <= took < 2.0, took
    # send(): one message per round trip, paced too
    single = StreamProducer(redis_client, "one", rate_limit=500)
    t0 = time.monotonic()
    for _ in range(50):
        single.send(b"y")
    took = time.monotonic() - t0
    assert 0.09 <= took < 1.5, took
    assert redis_client.xlen("s") == 2000 and redis_client.xlen("f") == 100 and redis_client.xlen("one") == 50


@pytest.mark.parametrize("proc_backend", ["numpy", "cuda"])
def test_batch_processor_direct(request, proc_backend):
    if proc_backend == "cuda":
        request.getfixturevalue("gpu")
    with BatchProcessor(slot_bytes=64, max_batch=8, backend=proc_backend) as proc:
        mixed = [b"", b"a", b"x" * 64, memoryview(b"mv-payload"), bytearray(b"ba")]
        assert proc.process(mixed) == [bytes(p) for p in mixed]
        equal = [bytes([i]) * 16 for i in range(8)]  # equal sizes: the strided path
        assert proc.process(equal) == equal
        assert proc.process([]) == []
        with pytest.raises(PayloadError, match=r"payload 1 is 65 bytes; slot_bytes is 64"):
            proc.process([b"ok", b"x" * 65, b"ok"])
        with pytest.raises(ValueError, match="max_batch is 8"):
            proc.process([b"x"] * 9)
        lens, out = proc.process_packed(np.array([2, 70, 3], np.uint32), b"ab" + b"y" * 70 + b"cde")
        assert lens.tolist() == [2, FAILED, 3] and bytes(out) == b"abcde"  # oversized: failed, not run
        with pytest.raises(ValueError, match="add up to"):
            proc.process_packed([2, 2], b"abc")
        assert proc.process([b"after"]) == [b"after"]  # errors left it usable
    assert proc.closed
    with pytest.raises(GpuqError, match="closed"):
        proc.process([b"x"])


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


@pytest.mark.parametrize("frame", [1, 4])
def test_gpu_bridge_round_trip(redis_client, make_queue, backend, frame):
    n = 3001
    payloads = make_payloads(n, seed=11, max_len=100)
    payloads[5] = b"z" * 129  # larger than a slot: a failed (None) result
    ids = StreamProducer(redis_client, "s", frame=frame).send_many(payloads)
    q = make_queue(capacity=256, slot_bytes=128)
    consumer = StreamConsumer(redis_client, "s", "g", "bridge", block_ms=50)
    bridge = GpuBridge(consumer, q, publish_batch=64)
    stats = bridge.run(max_messages=n, idle_exit_s=5)
    assert (stats.messages, stats.entries, stats.failed, stats.duplicates) == (n, len(ids), 1, 0)
    assert not bridge.busy() and consumer.pending() == 0
    expected = expected_results(ids, payloads, frame)
    expected[(ids[5 // frame], 5 % frame)] = None
    assert_exactly_once(all_results(redis_client, "s:results"), expected)
    s = q.stats()
    assert s.enqueued == s.processed == s.taken == n - 1 and s.occupied == 0


# --- 7. regressions from the fresh-user trial -------------------------------------------------

def test_entry_given_twice_to_complete_is_published_once_and_readable(redis_client):
    """complete([e, e]) used to list the entry under "dup" of its own result entry, which hid
    its one published result from read_results."""
    eid = StreamProducer(redis_client, "s").send(b"hello")
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    (entry,) = consumer.read()
    assert consumer.complete([entry, entry], [[b"hello"], [b"again"]]) == 1
    assert consumer.published == 1 and consumer.duplicates == 1
    assert all_results(redis_client, "s:results") == [((eid, 0), b"hello")]  # the first results
    assert consumer.pending() == 0


def test_gpu_bridge_reclaiming_its_own_entries_publishes_each_once(redis_client):
    """claim_idle_ms=0 with a reclaim every step: XAUTOCLAIM hands the bridge the entries it
    still has in flight; they must not be enqueued (and completed) a second time."""
    from gpuq_driver import GpuQueue, QueueConfig

    n = 2000
    payloads = [b"%08d" % i for i in range(n)]
    ids = StreamProducer(redis_client, "s").send_many(payloads)
    consumer = StreamConsumer(redis_client, "s", "g", "bridge", claim_idle_ms=0, block_ms=50, count=50)
    with GpuQueue(QueueConfig(backend="sim", capacity=1024)) as q:
        bridge = GpuBridge(consumer, q, publish_batch=256, max_wait_s=0.01, reclaim_every_s=0.0)
        stats = bridge.run(max_messages=n, idle_exit_s=3)
    assert stats.reclaimed > 0, "the bridge never reclaimed its own entries: the case is not exercised"
    assert (stats.messages, stats.entries, stats.duplicates, stats.failed) == (n, n, 0, 0)
    assert consumer.pending() == 0 and redis_client.xpending("s", "g")["pending"] == 0
    assert_exactly_once(all_results(redis_client, "s:results"), expected_results(ids, payloads, 1))


@pytest.mark.parametrize("frame", [1, 2])
def test_producer_rejects_none_and_non_buffers_sending_nothing(redis_client, frame):
    from gpuq_driver.errors import PayloadTypeError

    producer = StreamProducer(redis_client, "s", frame=frame)
    for bad in (None, 12345, [1, 2], np.arange(8, dtype=np.uint32)[::2]):  # the last: not C-contiguous
        with pytest.raises(PayloadTypeError, match="payload 1 "):
            producer.send_many([b"good", bad, b"x", b"y"])
        with pytest.raises(PayloadTypeError, match="payload 0 "):
            producer.send(bad)
    assert redis_client.exists("s") == 0, "nothing of a refused call may be sent"
    assert producer.sent_messages == producer.sent_entries == 0


@pytest.mark.parametrize("frame", [1, 3])
def test_producer_sends_non_byte_buffers_as_their_bytes(redis_client, frame):
    """redis-py (and len()) count a buffer's items, not its bytes: a uint32 array must be sent
    as its 4 bytes per item."""
    from array import array

    payloads = [np.arange(10, dtype=np.uint32), array("I", [1, 2, 3]), b"ab",
                memoryview(np.arange(3, dtype=np.uint16)), np.zeros((2, 3), dtype=np.float64), bytearray(b"xyz")]
    wanted = [bytes(memoryview(p).cast("B")) for p in payloads]
    assert [len(w) for w in wanted] == [40, 12, 2, 6, 48, 3]
    producer = StreamProducer(redis_client, "s", frame=frame)
    ids = producer.send_many(payloads)
    one = producer.send(np.array([7, 8], dtype="<u4"))
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    got = consumer.read()
    assert [e.id for e in got] == ids + [one]
    assert [e.lens.tolist() for e in got[:-1]] == [[len(w) for w in wanted[i:i + frame]]
                                                   for i in range(0, len(wanted), frame)]
    assert [bytes(p) for e in got[:-1] for p in e.payloads] == wanted
    assert [bytes(p) for p in got[-1].payloads] == [np.array([7, 8], dtype="<u4").tobytes()]


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
        [((good1, 0), b"before"), ((good2, 0), b"p"), ((good2, 1), b"qr")])
    (_, fields), = redis_client.xrange("s:results")
    assert bad in fields[b"ids"].split(b",")  # completed (acked) with no results


def test_completion_split_under_a_low_proto_max_bulk_len(redis_server, redis_client):
    """40 results of 60 kB (2.4 MB) on a server taking values of at most 1 MiB: complete() sends
    several scripts of at most half of it, instead of one that Redis refuses."""
    server = RedisServer(redis_server.executable)
    try:
        client = connect(server.url)
        client.config_set("proto-max-bulk-len", 1 << 20)
        payloads = [bytes([i]) * 60_000 for i in range(40)]
        ids = StreamProducer(client, "s").send_many(payloads)
        consumer = StreamConsumer(client, "s", "g", "w", block_ms=50)
        with BatchProcessor(slot_bytes=65536, max_batch=64, backend="numpy") as proc:
            stats = StreamWorker(consumer, proc).run(max_messages=40, idle_exit_s=2)
        assert (stats.entries, stats.failed, stats.duplicates) == (40, 0, 0)
        assert consumer.pending() == 0 and consumer.published == 40
        rows = client.xrange("s:results")
        assert len(rows) >= 2 and all(len(f[b"r"]) <= 1 << 19 for _, f in rows), [len(f[b"r"]) for _, f in rows]
        assert_exactly_once(all_results(client, "s:results"), expected_results(ids, payloads, 1))
        client.close()
    finally:
        server.close()


def test_xadds_refused_mid_pipeline_report_the_stored_ids(redis_server):
    """maxmemory with noeviction: Redis stores the first XADDs of a round trip and refuses the
    rest (OOM).  BrokerError (not BrokerUnavailable) with sent_ids = exactly what it stored."""
    server = RedisServer(redis_server.executable)
    try:
        client = connect(server.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 300_000)
        producer = StreamProducer(client, "s", pipeline=100)
        with pytest.raises(BrokerError) as ei:
            producer.send_many([b"%06d" % i + b"x" * 1000 for i in range(1000)])
        assert not isinstance(ei.value, BrokerUnavailable)
        assert "maxmemory" in str(ei.value) and ei.value.url == server.url
        client.config_set("maxmemory", 0)
        stored = [eid for eid, _ in client.xrange("s")]
        assert 0 < len(stored) < 1000
        assert ei.value.sent_ids == stored
        client.close()
    finally:
        server.close()


def test_connect_to_a_server_that_is_not_redis_is_broker_error(redis_py):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve():  # an HTTP server: one answer per connection, then close
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            except OSError:
                pass
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(BrokerError) as ei:
            connect(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2)
        assert not isinstance(ei.value, BrokerUnavailable) and f"127.0.0.1:{port}" in str(ei.value)
    finally:
        listener.close()


def test_connect_argument_errors_are_config_errors(redis_server):
    for url in ("redis://:s3cret-pw@127.0.0.1:99999/0", "redis://bob:s3cret-pw@127.0.0.1:99999/0"):
        with pytest.raises(ConfigError) as ei:
            connect(url)
        assert "s3cret-pw" not in str(ei.value) and "99999" in str(ei.value)
    for timeout in (0, 0.0, -1):
        with pytest.raises(ConfigError, match="socket_timeout_s="):
            connect(redis_server.url, socket_timeout_s=timeout)


def test_read_and_reclaim_arguments_are_checked(redis_client):
    StreamProducer(redis_client, "s").send_many([b"a", b"b"])
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    for call, field in ((lambda: consumer.read(count=0), "count"), (lambda: consumer.read(block_ms=-1), "block_ms"),
                        (lambda: consumer.reclaim(min_idle_ms=-1), "min_idle_ms"),
                        (lambda: consumer.reclaim(count=0), "count")):
        with pytest.raises(ConfigError, match=f"{field}="):
            call()
    assert redis_client.xpending("s", "g")["pending"] == 0  # nothing was read
    with pytest.raises(ConfigError, match="count="):
        StreamConsumer(redis_client, "s", "g", "c", count=2 ** 62)
    with pytest.raises(ConfigError, match="result_stream="):
        StreamConsumer(redis_client, "s", "g", "c", result_stream="s")


def test_bridge_and_worker_arguments_are_checked(redis_client):
    from gpuq_driver import GpuQueue, QueueConfig

    consumer = StreamConsumer(redis_client, "s", "g", "c")
    with GpuQueue(QueueConfig(backend="sim", capacity=64)) as q:
        for kwargs, field in (({"publish_batch": 0}, "publish_batch"), ({"publish_batch": "x"}, "publish_batch"),
                              ({"reclaim_every_s": -1}, "reclaim_every_s")):
            with pytest.raises(ConfigError, match=f"{field}="):
                GpuBridge(consumer, q, **kwargs)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        for value in (-1, -0.5, "1"):
            with pytest.raises(ConfigError, match="reclaim_every_s="):
                StreamWorker(consumer, proc, reclaim_every_s=value)
    with pytest.raises(ConfigError, match="threads_per_block="):
        BatchProcessor(threads_per_block="64", backend="numpy")


def test_read_with_a_short_socket_timeout_polls(redis_server):
    """A socket timeout too short for a BLOCK to return safely in time (Redis times blocked
    clients out on its 100 ms timer, so BLOCK 1 can take 100 ms): read() polls instead, waits
    the whole block_ms and returns [] without raising."""
    for timeout_s, block_ms in ((0.05, 600), (0.2, 1000)):
        client = connect(redis_server.url, socket_timeout_s=timeout_s)
        try:
            consumer = StreamConsumer(client, f"poll-{block_ms}", "g", "c")
            t0 = time.monotonic()
            assert consumer.read(block_ms=block_ms) == []
            took = time.monotonic() - t0
            assert block_ms / 1000 - 0.05 <= took < block_ms / 1000 + 1.0, (timeout_s, took)
        finally:
            client.close()


def test_find_redis_server_honours_env_strictly(monkeypatch, tmp_path):
    from gpuq_driver.streams import find_redis_server

    missing = str(tmp_path / "no-such-redis-server")
    monkeypatch.setenv("GPUQ_REDIS_SERVER", missing)
    with pytest.raises(BrokerError, match=re.escape(missing)):
        find_redis_server()
    monkeypatch.setenv("GPUQ_REDIS_SERVER", str(tmp_path))  # a folder is not an executable
    with pytest.raises(BrokerError, match=re.escape(str(tmp_path))):
        find_redis_server()


def test_find_redis_server_takes_the_newest(monkeypatch, tmp_path, redis_server):
    from gpuq_driver.streams import find_redis_server
    from gpuq_driver.streams.server import redis_server_binaries, redis_server_version

    monkeypatch.delenv("GPUQ_REDIS_SERVER", raising=False)
    found = {exe: redis_server_version(exe) for exe in redis_server_binaries()}
    found = {exe: v for exe, v in found.items() if v}
    assert found, "the redis_server fixture found a binary, find_redis_server's helpers did not"
    assert redis_server_version(find_redis_server()) == max(found.values())
    if len(set(found.values())) < 2:
        return
    # the oldest first on PATH, the newest last: still the newest
    oldest, newest = min(found, key=found.get), max(found, key=found.get)
    for name, exe in (("old", oldest), ("new", newest)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "redis-server").symlink_to(exe)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "old"), str(tmp_path / "new"), os.environ["PATH"]]))
    assert os.path.realpath(find_redis_server()) == os.path.realpath(newest)


def test_read_results_skips_foreign_entries_with_a_warning(redis_client):
    eid = StreamProducer(redis_client, "s").send(b"real")
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    redis_client.xadd("s:results", {b"x": b"y"})
    consumer.complete(consumer.read(), [[b"result"]])
    foreign_last = redis_client.xadd("s:results", {b"ids": b"1-0", b"r": b"\x05\x00"})  # a broken frame
    with pytest.warns(UserWarning, match="not a result entry") as record:
        last, got = read_results(redis_client, "s:results")
    assert len(record) == 2
    assert got == [((eid, 0), b"result")] and last == foreign_last


def test_redis_server_closed_once_its_process_is_killed(redis_server):
    server = RedisServer(redis_server.executable)
    try:
        assert not server.closed
        os.kill(server._proc.pid, signal.SIGKILL)
        server._proc.wait(10)
        assert server.closed and "closed" in repr(server)
    finally:
        server.close()
    assert server.closed


def test_redis_server_that_exits_at_once_says_so_with_its_status(redis_py):
    """Issue 10 item 8: a binary that is not redis-server exits at once: say so, with the status,
    rather than waiting out the PING timeout; a negative startup timeout is refused."""
    import shutil

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary on this machine")
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match=r"exited with status 1 before answering PING; its log:\n\(empty\)"):
        RedisServer(false)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="startup_timeout_s"):
        RedisServer(false, startup_timeout_s=-1)


@pytest.mark.parametrize("bad, expect", [
    (np.array([b"a", "b", 3], dtype=object), "object pointers"),
    (np.zeros(2, dtype=object), "object pointers"),
    (np.zeros(1, "datetime64[s]"), "bytes-like"),
    (None, "bytes-like"),
])
def test_one_payload_check_for_every_entry_point(redis_client, bad, expect):
    """Issue 10 item 1: the producer and the batch path refuse what GpuQueue.enqueue refuses
    (object arrays used to be sent as raw pointer bytes), with PayloadTypeError naming the payload."""
    from gpuq_driver.errors import PayloadTypeError

    producer = StreamProducer(redis_client, "s")
    with pytest.raises(PayloadTypeError, match=f"payload 0 .*{expect}|payload 0 must be {expect}"):
        producer.send(bad)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        with pytest.raises(PayloadTypeError, match=f"payload 1 .*{expect}|payload 1 must be {expect}"):
            proc.process([b"ok", bad])
    with GpuQueue(QueueConfig(backend="sim", capacity=8, slot_bytes=64)) as q:
        with pytest.raises(PayloadTypeError, match=expect):
            q.enqueue(bad)
        assert q.stats().enqueued == 0
    assert redis_client.exists("s") == 0


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
