"""Track A with the redis-py clients people make themselves (issue 10, items 5-7), against real
redis-server processes (6.2 and 7, through the ``redis_server`` fixture of tests/conftest.py):

* a client that retries timeouts (redis-py 8's ``redis.Redis(...)`` default) must not store a
  message twice when the server is busy: XADD and the completion script run without retries;
* RESP3 clients (``protocol=3``) and redis-py's unified replies (``legacy_responses=False``)
  work like RESP2 ones;
* a shared client whose pool has no free connection says so, naming ``max_connections``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time

import pytest

from gpuq_driver.errors import BrokerError, BrokerUnavailable, ConfigError
from gpuq_driver.streams import StreamConsumer, StreamProducer, connect, read_results
from gpuq_driver.streams.consumer import stream_rows
from gpuq_driver.streams.server import without_retries

from .streams_helpers import all_results, assert_exactly_once, expected_results, make_payloads

# Keeps the server busy for ARGV[1] seconds (a script runs alone: every other client waits;
# Redis answers BUSY only after 5 s).  DEBUG SLEEP would do the same, but Redis 7 disables DEBUG.
BUSY_LUA = """
local t = redis.call('TIME')
local t0 = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - t0 >= tonumber(ARGV[1]) * 1000000
return 1
"""


@contextlib.contextmanager
def busy_server(redis_py, url: str, seconds: float = 1.5):
    """The server runs a busy script for ``seconds`` from another connection; the block runs
    while it does, and the context ends when the server answers again."""
    other = redis_py.Redis.from_url(url, socket_timeout=30)
    thread = threading.Thread(target=other.eval, args=(BUSY_LUA, 0, seconds), daemon=True)
    thread.start()
    time.sleep(0.2)  # the EVAL is on the wire and running
    try:
        yield
    finally:
        thread.join(30)
        other.close()


def retrying_client(redis_py, server):
    """The client of the issue: plain redis.Redis(host, port, socket_timeout=0.3), redis-py's
    default retry (redis-py 8 retries a timed-out command)."""
    client = redis_py.Redis(host="127.0.0.1", port=server.port, socket_timeout=0.3)
    client.flushall()
    return client


# --- item 5: a client that retries must not duplicate messages ---------------------------------


@pytest.mark.parametrize("make", ["redis.Redis(host, port)", "connect(url)"])
@pytest.mark.parametrize("op", ["send", "send_many"])
def test_send_to_a_busy_server_is_stored_once(redis_server, redis_py, make, op):
    if make == "connect(url)":
        client = connect(redis_server.url, socket_timeout_s=0.3)
        client.flushall()
    else:
        client = retrying_client(redis_py, redis_server)
        assert client.get_retry().get_retries() > 0, "redis-py no longer retries by default: the case is gone"
    retries = client.get_retry() and client.get_retry().get_retries()
    producer = StreamProducer(client, "s")
    producer.send(b"warm")  # a connection is open: the XADD below reaches the server
    error = None
    with busy_server(redis_py, redis_server.url, 1.5):
        try:
            if op == "send":
                producer.send(b"once")
            else:
                producer.send_many([b"%d" % i for i in range(10)])
        except BrokerError as exc:
            error = exc
    stored = 1 if op == "send" else 10
    assert client.xlen("s") == 1 + stored, "a retried XADD stored the messages twice"
    assert type(error) is BrokerUnavailable and "Timeout" in str(error) and error.sent_ids == [], repr(error)
    assert (client.get_retry() and client.get_retry().get_retries()) == retries, "the user's client was changed"
    producer.send(b"after")  # the producer goes on once the server answers
    assert client.xlen("s") == 2 + stored
    client.close()


def test_complete_on_a_busy_server_publishes_once_and_counts_no_duplicate(redis_server, redis_py):
    client = retrying_client(redis_py, redis_server)
    ids = StreamProducer(client, "s").send_many([b"a", b"b", b"c"])
    consumer = StreamConsumer(client, "s", "g", "c", block_ms=0)
    entries = consumer.read()
    assert consumer.complete(entries[:1], [[b"A"]]) == 1  # a connection is open for the script
    with busy_server(redis_py, redis_server.url, 1.5):
        with pytest.raises(BrokerUnavailable, match="Timeout"):
            consumer.complete(entries[1:], [[b"B"], [b"C"]])
    # the script ran once, after the busy spell: both entries acked and published, not counted twice
    assert client.xlen("s:results") == 2 and consumer.pending() == 0
    assert (consumer.published, consumer.duplicates) == (1, 0)
    # a caller that retries after the error is told they were published already
    assert consumer.complete(entries[1:], [[b"B"], [b"C"]]) == 0 and consumer.duplicates == 2
    assert_exactly_once(all_results(client, "s:results"), {(ids[0], 0): b"A", (ids[1], 0): b"B", (ids[2], 0): b"C"})
    client.close()


def test_without_retries_copies_a_retrying_client_once_and_keeps_the_rest(redis_server, redis_py):
    plain = connect(redis_server.url)
    plain.flushall()
    assert without_retries(plain) is plain  # connect() clients never retry: no copy, no extra pool
    pool = redis_py.BlockingConnectionPool.from_url(
        redis_server.url,
        max_connections=7,
        timeout=3,
        protocol=3,
        retry=redis_py.retry.Retry(redis_py.backoff.NoBackoff(), 5),
    )
    client = redis_py.Redis(connection_pool=pool)
    twin = without_retries(client)
    assert twin is not client and without_retries(client) is twin  # one copy per pool, shared
    p = twin.connection_pool
    assert type(p) is redis_py.BlockingConnectionPool and (p.max_connections, p.timeout) == (7, 3)
    assert p.connection_kwargs["protocol"] == 3 and p.connection_kwargs["retry"].get_retries() == 0
    assert client.get_retry().get_retries() == 5  # the user's client keeps its policy
    assert twin.ping() and StreamProducer(client, "s").send(b"x") and client.xlen("s") == 1
    for c in (plain, client, twin):
        c.close()


def test_a_retrying_client_that_cannot_be_copied_is_refused(redis_server, redis_py):
    class OwnPool(redis_py.ConnectionPool):
        pass

    client = redis_py.Redis(
        connection_pool=OwnPool.from_url(redis_server.url, retry=redis_py.retry.Retry(redis_py.backoff.NoBackoff(), 3))
    )
    for make in (lambda: StreamProducer(client, "s"), lambda: StreamConsumer(client, "s", "g", "c")):
        with pytest.raises(ConfigError, match=r"OwnPool cannot be copied.*Retry\(redis.backoff.NoBackoff\(\), 0\)"):
            make()
    client.close()


# --- item 6: RESP3 and unified reply shapes ----------------------------------------------------


def test_stream_rows_reads_every_reply_shape():
    rows = [(b"1-0", {b"d": b"x"}), (b"2-0", {b"d": b"y"})]
    one = [(b"1-0", {b"d": b"x"})]
    for reply, want in [
        ([[b"s", rows]], rows),
        ({b"s": [rows]}, rows),
        ({b"s": rows}, rows),
        ([[b"s", one]], one),
        ({b"s": [one]}, one),
        ({b"s": one}, one),
        (None, []),
        ([], []),
        ({}, []),
        ([[b"s", []]], []),
        ({b"s": [[]]}, []),
        ({b"s": []}, []),
    ]:
        assert stream_rows(reply) == want, reply


def _shapes():
    import redis

    unified = "legacy_responses" in inspect.signature(redis.Redis).parameters
    return [
        pytest.param(p, legacy, id=f"resp{p}-{'legacy' if legacy else 'unified'}")
        for p in (2, 3)
        for legacy in ((True, False) if unified else (True,))
    ]


@pytest.mark.parametrize("protocol, legacy", _shapes())
def test_every_reply_shape_round_trips(redis_server, redis_py, protocol, legacy):
    kwargs = {"protocol": protocol} if legacy else {"protocol": protocol, "legacy_responses": False}
    client = connect(redis_server.url, **kwargs)
    client.flushall()
    payloads = make_payloads(30, seed=protocol)
    ids = StreamProducer(client, "s", frame=3).send_many(payloads)
    mine = StreamConsumer(client, "s", "g", "mine", count=4, block_ms=0)
    other = StreamConsumer(client, "s", "g", "other", block_ms=0)
    got = mine.read()
    assert [e.id for e in got] == ids[:4] and [bytes(p) for p in got[1].payloads] == payloads[3:6]
    mine.complete(got, [[bytes(p) for p in e.payloads] for e in got])
    taken = other.read()  # the other 6 entries, never completed
    assert [e.id for e in taken] == ids[4:]
    assert other.read() == [] and mine.read(block_ms=50) == []
    client.xdel("s", ids[-1])  # one of them deleted before anyone acked it
    back = mine.reclaim(min_idle_ms=0, count=100)
    assert [e.id for e in back.entries] == ids[4:-1] and back.lost == [ids[-1]]
    mine.complete(back.entries, [[bytes(p) for p in e.payloads] for e in back.entries])
    assert mine.pending() == 0 and mine.published == 9
    want = {k: v for k, v in expected_results(ids, payloads, 3).items() if k[0] != ids[-1]}
    assert_exactly_once(all_results(client, "s:results"), want)
    last, out = read_results(client, "s:results", "$", block_ms=10)  # an empty XREAD reply
    assert (last, out) == ("$", [])
    client.close()


# --- item 7: a shared client with no free connection --------------------------------------------


def _read_in_threads(consumers, block_ms: int, during=None, ready=None):
    """Every consumer reads (blocking) in its own thread, all at once; ``during()`` runs in this
    thread while they block, once ``ready(errors)`` is true (polled up to 10 s; default: 0.3 s
    after they all started).  Returns (results, errors) by thread."""
    results, errors = [None] * len(consumers), [None] * len(consumers)
    start = threading.Barrier(len(consumers) + 1)

    def read(i):
        start.wait()
        try:
            results[i] = consumers[i].read(block_ms=block_ms)
        except Exception as exc:  # noqa: BLE001 - collected and checked by the test
            errors[i] = exc

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(consumers))]
    for t in threads:
        t.start()
    start.wait()
    if ready is None:
        time.sleep(0.3)
    else:
        deadline = time.monotonic() + 10
        while not ready(errors):
            assert time.monotonic() < deadline, f"the threads never got there: {errors}"
            time.sleep(0.01)
    out = during() if during else None
    for t in threads:
        t.join(30)
    return results, errors, out


def test_110_threads_on_one_client_hear_about_max_connections(redis_server, redis_client):
    consumers = [StreamConsumer(redis_client, "s", "g", f"c{i}") for i in range(110)]
    producer = StreamProducer(redis_client, "s")

    def during():  # the pool is exhausted for every entry point, not only reads
        errs = []
        for call in (
            lambda: producer.send(b"x"),
            lambda: read_results(redis_client, "s:results"),
            consumers[0].pending,
        ):
            with pytest.raises(BrokerError) as exc:
                call()
            errs.append(exc.value)
        return errs

    pool = redis_client.connection_pool

    def exhausted(errors):  # 100 readers hold every connection, the other 10 have failed
        return len(pool._in_use_connections) >= 100 and sum(e is not None for e in errors) == 10

    results, errors, more = _read_in_threads(consumers, 4000, during, exhausted)
    failed = [e for e in errors if e is not None]
    assert len(failed) == 10 and results.count([]) == 100
    for exc in failed + more:
        assert type(exc) is BrokerError, f"pool exhaustion is not 'unreachable': {exc!r}"
        assert "max_connections=100" in str(exc) and "BlockingConnectionPool" in str(exc), str(exc)
    assert redis_client.xlen("s") == 0


def test_110_threads_wait_for_a_blocking_pool(redis_server, redis_py):
    pool = redis_py.BlockingConnectionPool.from_url(redis_server.url, max_connections=100, timeout=10)
    client = redis_py.Redis(connection_pool=pool)
    consumers = [StreamConsumer(client, "s", "g", f"c{i}") for i in range(110)]
    results, errors, _ = _read_in_threads(consumers, 500)
    assert errors == [None] * 110 and results == [[]] * 110
    # a BlockingConnectionPool that stays exhausted past its timeout says so too
    small = redis_py.Redis(
        connection_pool=redis_py.BlockingConnectionPool.from_url(redis_server.url, max_connections=1, timeout=0.2)
    )
    waiter = StreamConsumer(small, "s", "g", "w")

    def during():
        with pytest.raises(BrokerError, match="max_connections=1") as exc:
            read_results(small, "s:results")
        return exc.value

    _, errors, exc = _read_in_threads([waiter], 1000, during)
    assert errors == [None] and type(exc) is BrokerError
    client.close()
    small.close()
