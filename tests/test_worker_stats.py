"""WorkerStats after a completion that raised (issue 10 item 11).

The completion script (publish the results + XACK, one atomic step) is made to fail once with a
lost connection, either before it ran or after it ran with only its reply lost: the worker
raises BrokerUnavailable; run() again must publish every message exactly once, and the stats
must count each of them once.  It used to count 100 messages fewer where the script had run
(the rerun never saw those entries again), and to leave the entries pending for claim_idle_ms
where it had not.  Against a real redis-server; the failure is a patched redis-py call.
"""

import pytest

from gpuq_driver import GpuQueue, QueueConfig
from gpuq_driver.errors import BrokerUnavailable
from gpuq_driver.streams import BatchProcessor, GpuBridge, StreamConsumer, StreamProducer, StreamWorker, read_results

N = 1000


def make_worker(mode, consumer, closing):
    if mode == "batch":
        proc = closing(BatchProcessor(slot_bytes=64, max_batch=64, backend="numpy"))
        return StreamWorker(consumer, proc)
    queue = closing(GpuQueue(QueueConfig(backend="sim", capacity=256, slot_bytes=64)))
    return GpuBridge(consumer, queue, publish_batch=50)


@pytest.mark.parametrize("mode", ["batch", "bridge"])
@pytest.mark.parametrize("lost", ["before", "after"], ids=["script-not-run", "reply-lost"])
def test_messages_are_counted_once_after_a_completion_raised(redis_client, monkeypatch, mode, lost):
    import redis

    payloads = [b"%06d" % i for i in range(N)]
    StreamProducer(redis_client, "s").send_many(payloads)
    # claim_idle_ms stays at its 30 s default: nothing may depend on reclaiming the entries
    consumer = StreamConsumer(redis_client, "s", "g", "w", count=100, block_ms=50)

    real, calls = redis.Redis.evalsha, []

    def flaky(self, *args):  # the third completion loses its connection
        calls.append(args)
        if len(calls) == 3:
            if lost == "after":
                real(self, *args)
            raise redis.ConnectionError("Connection closed by server.")
        return real(self, *args)

    monkeypatch.setattr(redis.Redis, "evalsha", flaky)
    engines = []
    worker = make_worker(mode, consumer, lambda e: engines.append(e) or e)
    try:
        with pytest.raises(BrokerUnavailable):
            worker.run(idle_exit_s=0.5)
        assert len(calls) == 3 and worker.busy()
        stats = worker.run(idle_exit_s=0.5)
    finally:
        for e in engines:
            e.close()

    _, rows = read_results(redis_client, "s:results", count=100_000)
    assert sorted(rows) == sorted(
        ((eid, 0), p) for eid, p in zip((e for e, _ in redis_client.xrange("s")), payloads)
    ), "not exactly once"
    assert (stats.messages, stats.entries, stats.failed, stats.duplicates) == (N, N, 0, 0)
    assert consumer.pending() == 0 and not worker.busy()
