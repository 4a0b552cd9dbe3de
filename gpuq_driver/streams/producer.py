"""StreamProducer: XADD messages to a Redis stream, pipelined, trimmed, optionally rate-limited."""

from __future__ import annotations

import time

from ..errors import BrokerError, ConfigError, PayloadError, check_int, check_name
from ..payload import byte_view, byte_views
from .server import broker_errors, check_client, without_retries
from .wire import FRAME, PAYLOAD, encode_frame

MAX_ENTRY_BYTES = 512 << 20  # Redis's default proto-max-bulk-len


class StreamProducer:
    """Appends messages to ``stream`` with XADD ... MAXLEN ~ ``maxlen``.

    client:      a ``redis.Redis`` (binary replies), e.g. from :func:`connect`.
    maxlen:      approximate cap on the stream's length in entries (default 1,000,000); Redis trims
                 whole listpack nodes, so the stream may hold somewhat more.  Entries trimmed before
                 a consumer acked them are reported lost by :meth:`StreamConsumer.reclaim`.
    frame:       messages per entry (default 1: plain entries ``{b"d": payload}``; > 1 packs that
                 many into one frame entry, see :mod:`gpuq_driver.streams.wire`).
    pipeline:    entries per round trip in :meth:`send_many` (default 1000).
    rate_limit:  messages/s ceiling (None = as fast as Redis takes them); paced per round trip.

    Payloads: bytes-like (bytes, bytearray, memoryview, C-contiguous numpy arrays: their bytes);
    anything else raises PayloadTypeError, an entry over 512 MiB (Redis's default
    proto-max-bulk-len) PayloadError, before anything of that call is sent.

    Nothing is retried: an XADD whose reply never came may or may not be stored, and retrying it
    could store it twice.  A client that retries (redis-py 8's ``redis.Redis(...)`` retries
    timeouts by default) is neutralised, not refused: XADDs go through a copy of it with retries
    off (:func:`~gpuq_driver.streams.server.without_retries`; ``client`` itself is left as it
    is; one on a pool class that cannot be copied, e.g. Sentinel's, is refused: ConfigError).
    On a lost connection, or no reply within the client's ``socket_timeout`` (seconds; a
    busy server), BrokerUnavailable is raised with ``sent_ids``: the ids of the round trips Redis
    answered (the round trip in flight may or may not be stored, once).  If Redis refuses some
    XADDs of a round trip (e.g. OOM), BrokerError is raised after it with ``sent_ids`` holding
    every id Redis did store, that round trip's included.  A client whose pool has no free
    connection raises BrokerError naming its ``max_connections``.
    """

    def __init__(
        self,
        client,
        stream: str,
        *,
        maxlen: int = 1_000_000,
        frame: int = 1,
        pipeline: int = 1000,
        rate_limit: float | None = None,
    ):
        for name, value in (("maxlen", maxlen), ("frame", frame), ("pipeline", pipeline)):
            check_int(name, value, 1)
        if rate_limit is not None and (
            isinstance(rate_limit, bool) or not isinstance(rate_limit, (int, float)) or not rate_limit > 0
        ):
            raise ConfigError(f"rate_limit={rate_limit!r} must be > 0 messages/s, or None")
        self.client, self.stream, self.maxlen = client, check_name("stream", stream), maxlen
        self.frame, self.pipeline, self.rate_limit = frame, pipeline, rate_limit
        self.url = check_client(client)
        self._writer = without_retries(client)
        self.sent_messages = 0
        self.sent_entries = 0
        self._t0 = None

    def send(self, payload) -> bytes:
        """XADD one message as a plain entry; returns its entry id (e.g. ``b"1732900000000-0"``)."""
        return self._xadd([{PAYLOAD: byte_view(payload)}], 1)[0]

    def send_many(self, payloads) -> list[bytes]:
        """XADD ``payloads`` (bytes-like) in pipelined round trips; returns the entry ids, in order.

        With ``frame`` > 1 each entry holds up to ``frame`` consecutive messages, so the list has
        ceil(len / frame) ids.  Raises BrokerUnavailable (with ``sent_ids``) if Redis goes away.
        """
        # bytes as they are, other buffers as byte views (redis-py would count their items, not bytes)
        payloads = byte_views(payloads)
        k = self.frame
        if k == 1:
            entries = [{PAYLOAD: p} for p in payloads]
        else:
            entries = [{FRAME: encode_frame(payloads[i : i + k])} for i in range(0, len(payloads), k)]
        for i, fields in enumerate(entries):
            size = len(next(iter(fields.values())))
            if size > MAX_ENTRY_BYTES:
                raise PayloadError(
                    f"entry {i} is {size} bytes; one Redis value is at most {MAX_ENTRY_BYTES} "
                    "(proto-max-bulk-len): send fewer messages per frame"
                )
        ids: list[bytes] = []
        for i in range(0, len(entries), self.pipeline):
            chunk = entries[i : i + self.pipeline]
            ids += self._xadd(chunk, min(len(payloads), (i + len(chunk)) * k) - i * k, ids)
        return ids

    def _xadd(self, entries: list[dict], messages: int, sent: list | None = None) -> list[bytes]:
        if self.rate_limit:
            if self._t0 is None:
                self._t0 = time.monotonic() - self.sent_messages / self.rate_limit
            wait = self._t0 + (self.sent_messages + messages) / self.rate_limit - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        with broker_errors(self.url, f"XADD {self.stream}", sent, self._writer):
            if len(entries) == 1:
                ids = [self._writer.xadd(self.stream, entries[0], maxlen=self.maxlen, approximate=True)]
            else:
                pipe = self._writer.pipeline(transaction=False)
                for fields in entries:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                ids = pipe.execute(raise_on_error=False)
        refused = [r for r in ids if isinstance(r, Exception)]
        if refused:
            stored = (sent or []) + [r for r in ids if not isinstance(r, Exception)]
            raise BrokerError(
                f"XADD {self.stream}: Redis at {self.url} refused {len(refused)} of {len(ids)} entries: {refused[0]}",
                self.url,
                stored,
            )
        self.sent_messages += messages
        self.sent_entries += len(ids)
        return ids

    def __repr__(self) -> str:
        return (
            f"<StreamProducer {self.stream} on {self.url}: {self.sent_messages} messages "
            f"in {self.sent_entries} entries>"
        )
