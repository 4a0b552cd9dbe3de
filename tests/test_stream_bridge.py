"""GpuBridge (gpuq_driver.streams.bridge): Redis Streams into a running GpuQueue, against real
redis-server processes (the ``redis_client`` fixture of tests/conftest.py, once per Redis version).
GPU variants take the ``backend`` fixture's "cuda" value and skip without a GPU.
"""

from __future__ import annotations

import pytest

from gpuq_driver.streams import GpuBridge, StreamConsumer, StreamProducer

from .streams_helpers import all_results, assert_exactly_once, expected_results, make_payloads


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


def test_gpu_bridge_frames_larger_than_the_ring_with_oversized_messages_anywhere(redis_client, make_queue):
    """Frames of 100 messages into a ring of 32 slots: an entry goes in over several enqueue_many
    calls and comes back over several takes; messages larger than a slot (first, last, in runs) get
    no result (None) and the others keep their places."""
    n, frame = 1000, 100
    payloads = make_payloads(n, seed=12, max_len=50)  # at most 57 bytes
    for i in (0, 99, 100, 101, 102, 250, 555, 999):
        payloads[i] = b"L" * (65 + i % 7)  # larger than the 64-byte slot
    ids = StreamProducer(redis_client, "s", frame=frame).send_many(payloads)
    q = make_queue(capacity=32, slot_bytes=64)
    consumer = StreamConsumer(redis_client, "s", "g", "bridge", block_ms=50, count=3)
    bridge = GpuBridge(consumer, q, publish_batch=2)
    stats = bridge.run(max_messages=n, idle_exit_s=5)
    assert (stats.messages, stats.entries, stats.failed, stats.duplicates) == (n, len(ids), 8, 0)
    expected = expected_results(ids, payloads, frame)
    for i in (0, 99, 100, 101, 102, 250, 555, 999):
        expected[(ids[i // frame], i % frame)] = None
    assert_exactly_once(all_results(redis_client, "s:results"), expected)
    s = q.stats()
    assert s.enqueued == s.taken == n - 8 and s.occupied == 0


def test_gpu_bridge_publishes_a_message_the_plugin_failed_as_failed(redis_client, make_queue):
    """A plugin's GPUQ_FAIL(code) (MessageFailed when taken) is a failed (None) result, and the bridge goes on."""
    from .test_params import ODD  # fails a message whose first byte is odd

    payloads = [bytes([i % 256]) * 8 for i in range(300)]
    ids = StreamProducer(redis_client, "s").send_many(payloads)
    q = make_queue(capacity=64, slot_bytes=16, plugin=ODD)
    bridge = GpuBridge(StreamConsumer(redis_client, "s", "g", "bridge", block_ms=50), q, publish_batch=32)
    stats = bridge.run(max_messages=len(payloads), idle_exit_s=5)
    assert (stats.messages, stats.failed, stats.duplicates) == (300, 150, 0)
    expected = {(ids[i], 0): None if p[0] & 1 else p for i, p in enumerate(payloads)}
    assert_exactly_once(all_results(redis_client, "s:results"), expected)
    assert q.stats().occupied == 0
