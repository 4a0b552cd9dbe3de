"""StreamConsumer: one member of a consumer group, at-least-once, with reclaim and deduplication.

The protocol, per entry:

1. XREADGROUP delivers it to this consumer; Redis records it in the group's PEL (pending entries list).
2. The messages are processed (GPU batch or GpuQueue).
3. :meth:`StreamConsumer.complete` runs one Lua script, atomically: XACK each entry and add
   the results of those whose XACK removed them from the PEL to the result stream.  The ack and the
   stored result are one step, so a consumer killed at any moment leaves either both or neither;
   an entry that two consumers processed (one reclaimed it from the other, which was only slow)
   gets its results published once: by whichever completes first.  This is the deduplication by
   message id: the second result of a redelivered entry is dropped, never published.
4. Entries pending longer than ``claim_idle_ms`` (their consumer died or stalled) are taken over
   with XAUTOCLAIM by :meth:`StreamConsumer.reclaim`.  Delivered entries that MAXLEN trimming
   deleted before anyone acked them cannot be processed: they are reported in ``lost`` and
   removed from the PEL.  Entries trimmed before any consumer read them were never pending and
   cannot be reported: size ``maxlen`` above the largest backlog and watch the group's lag
   (XINFO GROUPS).
"""

from __future__ import annotations

import importlib.resources
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, check_int, check_name
from .server import broker_errors, check_client, without_retries
from .wire import FRAME, PAYLOAD, encode_frame, entry_messages, frames, items

# The completion script (XACK each entry, publish the results of those still pending, list the
# others as duplicates), one atomic call; the file documents its keys, arguments and costs.
_COMPLETE_LUA = importlib.resources.files(__package__).joinpath("complete.lua").read_text()


MAX_COUNT = 1_000_000  # entries per read / reclaim (Redis 7 refuses huge XAUTOCLAIM counts)
COMPLETE_MAX_BYTES = 64 << 20  # result bytes per completion script (Redis: 512 MiB per value)


class Entry:
    """One stream entry delivered to this consumer.

    id:        the entry id (bytes, e.g. ``b"1732900000000-0"``); with the index, the message id.
    lens:      its messages' sizes in bytes (uint32 array; one for a plain entry).
    data:      its messages' bytes back to back (memoryview).
    payloads:  the messages as a list of memoryviews (built on first use).
    error:     why the entry could not be decoded (it is completed with no results), else None.
    """

    __slots__ = ("id", "lens", "data", "error", "_payloads")

    def __init__(self, id, lens, data, error: str | None = None):
        self.id, self.lens, self.data, self.error, self._payloads = id, lens, data, error, None

    @property
    def payloads(self) -> list:
        if self._payloads is None:
            self._payloads = items(self.lens, self.data)
        return self._payloads

    def __len__(self) -> int:
        return len(self.lens)

    def __repr__(self) -> str:
        error = f" {self.error}" if self.error else ""
        return f"<Entry {self.id!r}: {len(self.lens)} messages, {len(self.data)} bytes{error}>"


@dataclass
class Reclaimed:
    """What one :meth:`StreamConsumer.reclaim` found: entries now owned by this consumer, and
    ids of pending entries that trimming had deleted (removed from the PEL, reported here)."""

    entries: list = field(default_factory=list)
    lost: list = field(default_factory=list)


class StreamConsumer:
    """Consumer ``consumer`` of group ``group`` on ``stream``; results go to ``result_stream``.

    client:         a ``redis.Redis`` with binary replies (see :func:`connect`).
    count:          entries per XREADGROUP (default 1000; at most 1,000,000).
    block_ms:       how long :meth:`read` waits for new entries (ms, default 1000; 0 = no wait).
                    Waits longer than the client's socket timeout are cut into XREADGROUP
                    calls 250 ms shorter than it, so they return empty rather than raise
                    TimeoutError (with a socket timeout under 0.3 s, read polls instead).
    claim_idle_ms:  pending entries idle this long are reclaimed (ms, default 30,000).
    result_stream:  default ``stream + ":results"``; ``result_maxlen`` caps it (~, entries).
    start_id:       where a newly created group starts: ``"0"`` = the whole stream, ``"$"`` = new only.

    The group is created if missing (XGROUP CREATE ... MKSTREAM; an existing group is kept).
    Every method raises BrokerUnavailable when Redis cannot be reached, BrokerError when it
    refuses a command or when the client's pool has no free connection (its message names
    ``max_connections``: one blocked :meth:`read` holds a connection, so a client shared by N
    reading threads needs ``max_connections`` >= N, or a ``redis.BlockingConnectionPool``).
    Reads run with the client's own retry policy; :meth:`complete` runs without retries (see
    :func:`~gpuq_driver.streams.server.without_retries`).  RESP2 and RESP3 clients
    (``protocol=3``), with redis-py's legacy or unified replies (``legacy_responses``), work alike.
    """

    def __init__(
        self,
        client,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int = 1000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        result_stream: str | None = None,
        result_maxlen: int = 1_000_000,
        start_id: str = "0",
    ):
        check_int("count", count, 1, MAX_COUNT)
        check_int("block_ms", block_ms, 0)
        check_int("claim_idle_ms", claim_idle_ms, 0)
        check_int("result_maxlen", result_maxlen, 1)
        self.url = check_client(client)
        for name, value in (("stream", stream), ("group", group), ("consumer", consumer)):
            check_name(name, value)
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        if result_stream is None:
            result_stream = stream + (b":results" if isinstance(stream, bytes) else ":results")
        if result_stream == stream:
            raise ConfigError(
                f"result_stream={result_stream!r} is the input stream: results would be read back as input"
            )
        self.result_stream, self.result_maxlen = result_stream, result_maxlen
        self._block_slice = block_slice_ms(client)
        self.lost: list[bytes] = []  # every entry id reported lost so far
        self.published = 0  # entries whose results this consumer published
        self.duplicates = 0  # entries completed here after another consumer had
        self._writer = without_retries(client)  # the completion script is not retried
        self._complete = self._writer.register_script(_COMPLETE_LUA)  # no round trip: EVALSHA, then EVAL once
        self.ensure_group(start_id)
        self._max_script_bytes = COMPLETE_MAX_BYTES
        try:  # a server with a lower proto-max-bulk-len takes smaller scripts (CONFIG may be disabled)
            got = client.config_get("proto-max-bulk-len")
            bulk = int(got.get("proto-max-bulk-len") or got.get(b"proto-max-bulk-len") or 0)
            if bulk:
                self._max_script_bytes = min(COMPLETE_MAX_BYTES, bulk // 2)
        except Exception:  # noqa: BLE001 - only a tuning hint; the default suits a default server
            pass

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the group (and the stream) if missing; True if created, False if it existed."""
        import redis

        with broker_errors(self.url, f"XGROUP CREATE {self.stream} {self.group}", client=self.client):
            try:
                self.client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
                return True
            except redis.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return False
                raise

    def read(self, count: int | None = None, block_ms: int | None = None) -> list[Entry]:
        """New entries for this consumer (XREADGROUP ``>``), at most ``count``; waits up to
        ``block_ms`` ms when there are none and returns [] if none came."""
        count = check_int("count", self.count if count is None else count, 1, MAX_COUNT)
        block = check_int("block_ms", self.block_ms if block_ms is None else block_ms, 0)
        with broker_errors(self.url, f"XREADGROUP {self.stream} {self.group}", client=self.client):
            rows = blocking_rows(
                lambda wait: self.client.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=count, block=wait
                ),
                block,
                self._block_slice,
            )
        return _entries(rows)

    def reclaim(self, min_idle_ms: int | None = None, count: int | None = None) -> Reclaimed:
        """Take over entries pending longer than ``min_idle_ms`` (default ``claim_idle_ms``) with
        XAUTOCLAIM, scanning the whole PEL, up to ``count`` entries (default ``self.count``).

        Handles Redis 7+'s three-element reply (deleted ids listed) and Redis 6.2's two-element
        one (deleted entries come back as nil; their ids are found with XPENDING + XRANGE, then
        XACKed so they leave the PEL as Redis 7 does).  Lost ids are appended to ``self.lost``.
        """
        idle = check_int("min_idle_ms", self.claim_idle_ms if min_idle_ms is None else min_idle_ms, 0)
        limit = check_int("count", self.count if count is None else count, 1, MAX_COUNT)
        out, cursor = Reclaimed(), b"0-0"
        with broker_errors(self.url, f"XAUTOCLAIM {self.stream} {self.group}", client=self.client):
            while len(out.entries) < limit:
                reply = self.client.xautoclaim(
                    self.stream, self.group, self.consumer, idle, cursor, count=limit - len(out.entries)
                )
                nxt, claimed = reply[0], reply[1]
                found = [(eid, f) for eid, f in claimed if eid is not None]
                out.entries += _entries(found)
                if len(reply) > 2:  # Redis >= 7: deleted ids, already out of the PEL
                    out.lost += list(reply[2])
                elif len(found) < len(claimed):  # Redis 6.2: nil entries, still pending
                    out.lost += self._find_deleted(cursor, nxt, {eid for eid, _ in found})
                cursor = nxt
                if cursor in (b"0-0", "0-0"):
                    break
        self.lost += out.lost
        return out

    def _find_deleted(self, start, end, claimed: set) -> list[bytes]:
        """Redis 6.2: ids in this consumer's PEL between ``start`` and ``end`` that no longer
        exist in the stream; XACKs them."""
        hi = "+" if end in (b"0-0", "0-0") else end
        pel = self.client.xpending_range(self.stream, self.group, start, hi, 1 << 20, consumername=self.consumer)
        candidates = [p["message_id"] for p in pel if p["message_id"] not in claimed]
        pipe = self.client.pipeline(transaction=False)
        for eid in candidates:
            pipe.xrange(self.stream, eid, eid)
        gone = [eid for eid, rows in zip(candidates, pipe.execute()) if not rows]
        if gone:
            self.client.xack(self.stream, self.group, *gone)
        return gone

    def complete(self, entries: list[Entry], results: list) -> int:
        """Publish each entry's results and XACK it, atomically (see the module docstring).

        results[i] is the list of results of entries[i]'s messages (bytes-like, or None for a
        message that failed), or those results already encoded as one frame (bytes, see wire).
        Returns how many entries this call published; the others had been acked already
        (processed twice, published once) and are counted in ``duplicates``, as is an entry
        given twice in one call (its first results are used).  Batches whose results exceed
        64 MiB (or half the server's proto-max-bulk-len) go to Redis in several scripts, each
        atomic for its entries.  A script is never retried by the client: with no reply within
        the socket timeout it raises BrokerUnavailable, and those entries may or may not be
        completed; calling complete again with them is safe (published ones count as duplicates).
        """
        if len(entries) != len(results):
            raise ValueError(f"{len(entries)} entries but {len(results)} result lists")
        ids, frames, seen = [], [], set()
        for e, r in zip(entries, results):
            if e.id in seen:
                self.duplicates += 1
                continue
            seen.add(e.id)
            ids.append(e.id)
            frames.append(r if isinstance(r, (bytes, bytearray)) else encode_frame(r))
        n, start, size = 0, 0, 0
        for i, f in enumerate(frames + [None]):
            if f is None or (size + len(f) > self._max_script_bytes and i > start):
                n += self._publish(ids[start:i], frames[start:i])
                start, size = i, 0
            if f is not None:
                size += len(f)
        return n

    def _publish(self, ids: list, frames: list) -> int:
        if not ids:
            return 0
        args = [self.group, self.result_maxlen, b"".join(frames), *ids]
        with broker_errors(self.url, f"complete {len(ids)} entries of {self.stream}", client=self._writer):
            n = int(self._complete(keys=[self.stream, self.result_stream], args=args))
        self.published += n
        self.duplicates += len(ids) - n
        return n

    def pending(self) -> int:
        """Entries delivered to the group and not yet acked (all consumers)."""
        with broker_errors(self.url, f"XPENDING {self.stream} {self.group}", client=self.client):
            return int(self.client.xpending(self.stream, self.group)["pending"])

    def __repr__(self) -> str:
        return (
            f"<StreamConsumer {self.consumer} of {self.group} on {self.stream} ({self.url}): "
            f"{self.published} published, {self.duplicates} duplicates, {len(self.lost)} lost>"
        )


def stream_rows(reply) -> list:
    """The ``(entry id, fields)`` rows of an XREAD / XREADGROUP reply for one stream, in every
    shape redis-py gives it: RESP2 ``[[stream, rows]]``, RESP3 ``{stream: [rows]}`` and the
    unified ``{stream: rows}`` (``legacy_responses=False``); ``[]`` for no reply (None, [] or {}).
    (XAUTOCLAIM, XPENDING and CONFIG GET come back alike in all of them.)"""
    if not reply:
        return []
    rows = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if len(rows) == 1 and isinstance(rows[0], list) and (not rows[0] or isinstance(rows[0][0], (list, tuple))):
        rows = rows[0]  # RESP3's extra level: a row is (id, fields), its first item an id, not a row
    return rows


def _entries(rows) -> list[Entry]:
    """The Entries of ``(id, fields)`` rows.  Frames are split and checked together: one NumPy
    frombuffer each, then one cumsum for all (per-frame NumPy reductions cost more than the
    messages of a 32-message frame of 64 B); plain entries and frames that fail the check go
    through :func:`_entry`, which says what is wrong."""
    found = []  # (row index, frame, item count) of the frame entries
    for j, (_, fields) in enumerate(rows):
        f = fields.get(FRAME) if PAYLOAD not in fields else None
        if f is not None and len(f) >= 4:
            n = int.from_bytes(f[:4], "little")
            if 4 + 4 * n <= len(f):
                found.append((j, f, n))
    out = [None] * len(rows)
    if found:
        lens = [np.frombuffer(f, "<u4", n, 4) for _, f, n in found]
        counts = np.fromiter((n for _, _, n in found), np.int64, len(found))
        sums = np.concatenate(([0], np.cumsum(np.concatenate(lens), dtype=np.int64)))
        ends = np.cumsum(counts)
        body = np.fromiter((len(f) for _, f, _ in found), np.int64, len(found)) - 4 - 4 * counts
        # a FAILED length (4 GiB) cannot add up to a Redis value (at most 512 MiB): equal sums suffice
        ok = (sums[ends] - sums[ends - counts] == body).tolist()
        for (j, f, n), lens_j, good in zip(found, lens, ok):
            if good:
                out[j] = Entry(rows[j][0], lens_j, memoryview(f)[4 + 4 * n :])
    return [e if e is not None else _entry(*row) for e, row in zip(out, rows)]


def _entry(eid, fields) -> Entry:
    try:
        return Entry(eid, *entry_messages(fields))
    except ValueError as exc:
        return Entry(eid, np.zeros(0, np.uint32), memoryview(b""), f"undecodable entry: {exc}")


def block_slice_ms(client) -> int | None:
    """The longest single BLOCK (ms) that surely returns before ``client``'s socket timeout fires:
    Redis times blocked clients out on its 100 ms timer (hz 10), so 250 ms of margin; None where
    the client has no socket timeout; <= 0 where it is too short to BLOCK at all (then poll)."""
    pool = getattr(client, "connection_pool", None)
    timeout = pool.connection_kwargs.get("socket_timeout") if pool is not None else None
    return None if timeout is None else int(timeout * 1000) - 250


def blocking_rows(read, block_ms: int, slice_ms: int | None) -> list:
    """``stream_rows(read(block))``, waiting up to ``block_ms`` in all for rows to come: the wait is
    cut into BLOCKs of at most ``slice_ms`` (see :func:`block_slice_ms`), so a wait longer than the
    socket timeout returns [] instead of failing as if the server were unreachable.  ``read(None)``
    must not block."""
    deadline = time.monotonic() + block_ms / 1000
    block = block_ms
    while True:
        wait = block if slice_ms is None else min(block, slice_ms)
        rows = stream_rows(read(wait if wait > 0 else None))
        if rows:
            return rows
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        block = int(left * 1000)
        if wait <= 0:  # socket timeout too short to BLOCK safely: poll
            time.sleep(min(left, 0.005))


def read_results(client, result_stream: str, after: bytes | str = "0", count: int = 1000, block_ms: int | None = None):
    """Results in ``result_stream`` after entry ``after``: ``(last id read, [(msg_id, result)])``.

    msg_id = (source entry id, index); result = bytes, or None for a failed message.  Pass the
    returned id as ``after`` to continue.  ``block_ms`` waits up to that long for new results (ms;
    None or 0: no wait); a wait longer than the client's socket timeout is cut into shorter BLOCKs,
    as :meth:`StreamConsumer.read` does.  Each result entry is one ``complete`` call: fields ``ids`` (the
    source entry ids, comma-separated), ``r`` (their result frames back to back) and, where some
    had been published already by another consumer, ``dup`` (their 0-based positions, skipped
    here).  An entry of another shape is skipped with a warning.
    """
    block_ms = check_int("block_ms", 0 if block_ms is None else block_ms, 0)
    with broker_errors(check_client(client), f"XREAD {result_stream}", client=client):
        rows = blocking_rows(
            lambda wait: client.xread({result_stream: after}, count=count, block=wait), block_ms, block_slice_ms(client)
        )
    last, out = after, []
    for rid, fields in rows:
        last = rid
        try:
            dup = {int(k) for k in fields[b"dup"].split(b",")} if b"dup" in fields else ()
            got = [
                ((src, i), None if r is None else bytes(r))
                for k, (src, (lens, data)) in enumerate(zip(fields[b"ids"].split(b","), frames(fields[b"r"])))
                if k not in dup
                for i, r in enumerate(items(lens, data))
            ]
        except (KeyError, ValueError) as exc:
            warnings.warn(f"{result_stream} entry {rid!r} is not a result entry ({exc!r}): skipped", stacklevel=2)
            continue
        out += got
    return last, out
