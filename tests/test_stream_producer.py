"""StreamProducer (gpuq_driver.streams.producer) against real redis-server processes: config and
payload checks, pacing, buffers sent as their bytes, and the ids it reports when a round trip fails.

Tests that talk to Redis take the ``redis_server`` / ``redis_client`` fixtures (tests/conftest.py):
each runs once per Redis version found (6.2 and 7), and skips with the reason where there is none
(fails instead under GPUQ_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpuq_driver import ConfigError, GpuQueue, QueueConfig
from gpuq_driver.errors import BrokerError, BrokerUnavailable
from gpuq_driver.streams import BatchProcessor, RedisServer, StreamConsumer, StreamProducer, connect

from .streams_helpers import make_payloads


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"maxlen": 0}, "maxlen"),
        ({"maxlen": 1.5}, "maxlen"),
        ({"frame": 0}, "frame"),
        ({"frame": True}, "frame"),
        ({"pipeline": 0}, "pipeline"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_limit": -5.0}, "rate_limit"),
    ],
)
def test_producer_config_errors_name_the_field(redis_client, kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        StreamProducer(redis_client, "s", **kwargs)


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


@pytest.mark.parametrize("frame", [1, 2])
def test_producer_rejects_none_and_non_buffers_sending_nothing(redis_client, frame):
    from gpuq_driver.errors import PayloadTypeError

    producer = StreamProducer(redis_client, "s", frame=frame)
    for bad in (None, 12345, [1, 2], np.arange(8, dtype=np.uint32)[::2]):  # the last: not C-contiguous
        with pytest.raises(PayloadTypeError, match="payload 1 "):
            producer.send_many([b"good", bad, b"x", b"y"])
        with pytest.raises(PayloadTypeError, match="^payload (must|of)"):  # one message: no index
            producer.send(bad)
    assert redis_client.exists("s") == 0, "nothing of a refused call may be sent"
    assert producer.sent_messages == producer.sent_entries == 0


@pytest.mark.parametrize("frame", [1, 3])
def test_producer_sends_non_byte_buffers_as_their_bytes(redis_client, frame):
    """redis-py (and len()) count a buffer's items, not its bytes: a uint32 array must be sent
    as its 4 bytes per item."""
    from array import array

    payloads = [
        np.arange(10, dtype=np.uint32),
        array("I", [1, 2, 3]),
        b"ab",
        memoryview(np.arange(3, dtype=np.uint16)),
        np.zeros((2, 3), dtype=np.float64),
        bytearray(b"xyz"),
    ]
    wanted = [bytes(memoryview(p).cast("B")) for p in payloads]
    assert [len(w) for w in wanted] == [40, 12, 2, 6, 48, 3]
    producer = StreamProducer(redis_client, "s", frame=frame)
    ids = producer.send_many(payloads)
    one = producer.send(np.array([7, 8], dtype="<u4"))
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    got = consumer.read()
    assert [e.id for e in got] == ids + [one]
    assert [e.lens.tolist() for e in got[:-1]] == [
        [len(w) for w in wanted[i : i + frame]] for i in range(0, len(wanted), frame)
    ]
    assert [bytes(p) for e in got[:-1] for p in e.payloads] == wanted
    assert [bytes(p) for p in got[-1].payloads] == [np.array([7, 8], dtype="<u4").tobytes()]


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
    assert sent == stored[: len(sent)] and len(stored) - len(sent) < 100
    assert producer.sent_messages == producer.sent_entries == len(sent)


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


@pytest.mark.parametrize(
    "bad, expect",
    [
        (np.array([b"a", "b", 3], dtype=object), "object pointers"),
        (np.zeros(2, dtype=object), "object pointers"),
        (np.zeros(1, "datetime64[s]"), "bytes-like"),
        (None, "bytes-like"),
    ],
)
def test_one_payload_check_for_every_entry_point(redis_client, bad, expect):
    """Issue 10 item 1: the producer and the batch path refuse what GpuQueue.enqueue refuses
    (object arrays used to be sent as raw pointer bytes), with PayloadTypeError naming the payload."""
    from gpuq_driver.errors import PayloadTypeError

    producer = StreamProducer(redis_client, "s")
    with pytest.raises(PayloadTypeError, match=f"^payload .*{expect}|^payload must be {expect}"):
        producer.send(bad)
    with pytest.raises(PayloadTypeError, match=f"payload 1 .*{expect}|payload 1 must be {expect}"):
        producer.send_many([b"ok", bad])
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        with pytest.raises(PayloadTypeError, match=f"payload 1 .*{expect}|payload 1 must be {expect}"):
            proc.process([b"ok", bad])
    with GpuQueue(QueueConfig(backend="sim", capacity=8, slot_bytes=64)) as q:
        with pytest.raises(PayloadTypeError, match=expect):
            q.enqueue(bad)
        assert q.stats().enqueued == 0
    assert redis_client.exists("s") == 0


def test_one_message_passed_as_the_list_is_refused(redis_client):
    """send_many(b"abc") would send three 1-byte messages (bytes iterate as ints): refused, with
    the call that takes one message named; the same for BatchProcessor.process."""
    from gpuq_driver.errors import PayloadTypeError

    producer = StreamProducer(redis_client, "s")
    for one in (b"abc", bytearray(b"abc"), memoryview(b"abc"), "abc"):
        with pytest.raises(PayloadTypeError, match=r"list of messages.*use send\(\)"):
            producer.send_many(one)
    with pytest.raises(PayloadTypeError, match="list of messages, not int"):
        producer.send_many(3)
    with BatchProcessor(slot_bytes=64, backend="numpy") as proc:
        with pytest.raises(PayloadTypeError, match=r"use process\(\[payload\]\)"):
            proc.process(b"abc")
    assert redis_client.exists("s") == 0
