"""StreamConsumer and read_results (gpuq_driver.streams.consumer) against real redis-server processes:
read/complete/reclaim, entries completed twice, MAXLEN trimming of pending entries (reported lost),
blocking reads and socket timeouts, a dead server, config errors.

Tests that talk to Redis take the ``redis_server`` / ``redis_client`` fixtures (tests/conftest.py):
each runs once per Redis version found (6.2 and 7 answer XAUTOCLAIM differently), and skips with
the reason where there is none (fails instead under GPUQ_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import threading
import time

import pytest

from gpuq_driver import ConfigError
from gpuq_driver.errors import BrokerUnavailable
from gpuq_driver.streams import (
    BatchProcessor,
    RedisServer,
    StreamConsumer,
    StreamProducer,
    StreamWorker,
    connect,
    read_results,
)

from .streams_helpers import all_results, assert_exactly_once, expected_results, make_payloads, pel_ids


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


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"count": 0}, "count"),
        ({"count": "10"}, "count"),
        ({"block_ms": -1}, "block_ms"),
        ({"claim_idle_ms": -1}, "claim_idle_ms"),
        ({"claim_idle_ms": 1.0}, "claim_idle_ms"),
        ({"result_maxlen": 0}, "result_maxlen"),
    ],
)
def test_consumer_config_errors_name_the_field(redis_client, kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        StreamConsumer(redis_client, "s", "g", "c", **kwargs)
    assert redis_client.exists("s") == 0  # refused before touching Redis


def test_consumer_refuses_decoding_client(redis_server, redis_py):
    client = redis_py.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ConfigError, match="decode_responses"):
        StreamConsumer(client, "s", "g", "c")
    client.close()


def test_read_and_reclaim_arguments_are_checked(redis_client):
    StreamProducer(redis_client, "s").send_many([b"a", b"b"])
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=0)
    for call, field in (
        (lambda: consumer.read(count=0), "count"),
        (lambda: consumer.read(block_ms=-1), "block_ms"),
        (lambda: consumer.reclaim(min_idle_ms=-1), "min_idle_ms"),
        (lambda: consumer.reclaim(count=0), "count"),
    ):
        with pytest.raises(ConfigError, match=f"{field}="):
            call()
    assert redis_client.xpending("s", "g")["pending"] == 0  # nothing was read
    with pytest.raises(ConfigError, match="count="):
        StreamConsumer(redis_client, "s", "g", "c", count=2**62)
    with pytest.raises(ConfigError, match="result_stream="):
        StreamConsumer(redis_client, "s", "g", "c", result_stream="s")


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


def test_read_results_waits_longer_than_the_socket_timeout(redis_server):
    """A block_ms over the client's socket timeout is cut into shorter BLOCKs, as read() does: the
    server is fine, so the wait ends empty (or with what came), never as 'unreachable'."""
    import threading
    import time

    from gpuq_driver.streams import connect, read_results

    client = connect(redis_server.url, socket_timeout_s=0.5)
    client.delete("rr:results")
    t0 = time.monotonic()
    assert read_results(client, "rr:results", block_ms=1200) == ("0", [])
    assert 1.1 < time.monotonic() - t0 < 5
    # and a result that arrives during the wait is returned
    writer = connect(redis_server.url)
    threading.Timer(0.7, lambda: writer.xadd("rr:results", {"x": "1"})).start()
    with pytest.warns(UserWarning, match="not a result entry"):
        last, got = read_results(client, "rr:results", block_ms=3000)
    assert last != "0" and got == []
