"""How messages and results sit in stream entries: plain entries and frames.

A plain entry carries one message: fields ``{b"d": payload}``.  A *frame* entry carries many:
``{b"f": frame}``, where a frame is ``uint32 n | uint32 len[n] | the n payloads back to back``
(little-endian, no padding).  One Redis entry per message costs the server about 1 µs for XADD
and as much again for XREADGROUP and XACK (measured with INFO commandstats, benchmarks/NOTES.md),
which caps one Redis at a few hundred thousand entries/s; frames, like Kafka's record batches,
carry many messages per entry.  Redelivery, acks and deduplication work per entry; a message's
id is ``(entry id, index in the entry)``.

Results go to the result stream as one entry per completed batch, fields ``ids`` (the source
entry ids, comma-separated), ``r`` (one result frame per source entry, back to back) and, only
where some entries had been published already, ``dup`` (their ids: skip their frames).  A length
of ``FAILED`` (0xFFFFFFFF) marks a message that got no result (payload larger than the slot, or a
result larger than the slot).
"""

from __future__ import annotations

import struct

import numpy as np

from ..batch import FAILED

PAYLOAD = b"d"
FRAME = b"f"
_COUNT = struct.Struct("<I")
_ONE: dict = {}


def encode_frame(items) -> bytes:
    """``items`` (bytes-like, or None for a failed result) -> one frame (bytes)."""
    items = list(items)
    lens = np.fromiter(
        (FAILED if p is None else len(p) if type(p) is bytes else memoryview(p).nbytes for p in items),
        dtype="<u4",
        count=len(items),
    )
    return join_frame(lens, b"".join(p for p in items if p is not None))


def join_frame(lens: np.ndarray, data) -> bytes:
    """A frame from its lengths (uint32, FAILED for no item) and the items' bytes back to back."""
    return b"".join((_COUNT.pack(len(lens)), np.asarray(lens, "<u4").tobytes(), data))


def join_frames(counts, lens: np.ndarray, data) -> list[bytes]:
    """Many frames at once: frame j holds the next ``counts[j]`` lengths of ``lens`` (uint32,
    FAILED for no item) and their bytes, taken in order from ``data`` (every item's bytes back to
    back).  The headers are made in a few NumPy calls for all the frames, not a few per frame."""
    counts = np.asarray(counts, np.int64)
    lens = np.asarray(lens, "<u4")
    msg_ends = np.cumsum(counts)
    sizes = np.where(lens == FAILED, 0, lens)
    byte_ends = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))[msg_ends].tolist()
    headers = np.insert(lens, msg_ends - counts, counts.astype("<u4")).tobytes()  # n, then its lengths
    header_ends = (4 * (msg_ends + np.arange(1, len(counts) + 1))).tolist()
    data, out, h, b = memoryview(data).cast("B"), [], 0, 0
    for h1, b1 in zip(header_ends, byte_ends):
        out.append(b"".join((headers[h:h1], data[b:b1])))
        h, b = h1, b1
    return out


def split_frame(frame) -> tuple[np.ndarray, memoryview]:
    """One frame -> (lengths as uint32 array, FAILED for a missing item; the items' bytes back
    to back, a memoryview into ``frame``).  Raises ValueError if the lengths do not add up."""
    view = memoryview(frame).cast("B")
    if len(view) < 4:
        raise ValueError(f"frame of {len(view)} bytes is shorter than its 4-byte count")
    n = _COUNT.unpack_from(view)[0]
    if len(view) < 4 + 4 * n:
        raise ValueError(f"frame says {n} items but has {len(view)} bytes")
    lens = np.frombuffer(view, "<u4", n, 4)
    body = view[4 + 4 * n :]
    total = int(lens.sum(dtype=np.int64))
    if total != len(body):  # FAILED items carry no bytes: count them as 0 and check again
        total = int(lens[lens != FAILED].sum(dtype=np.int64))
        if total != len(body):
            raise ValueError(f"frame lengths add up to {total} bytes, its body has {len(body)}")
    return lens, body


def frames(blob):
    """Frames back to back -> iterator of (lengths, bytes) as :func:`split_frame` gives them."""
    view, pos = memoryview(blob).cast("B"), 0
    while pos < len(view):
        if len(view) - pos < 4:
            raise ValueError(f"{len(view) - pos} bytes left at byte {pos}, shorter than a frame's count")
        n = _COUNT.unpack_from(view, pos)[0]
        lens = np.frombuffer(view, "<u4", min(n, (len(view) - pos - 4) // 4), pos + 4)
        if len(lens) < n:
            raise ValueError(f"frame at byte {pos} says {n} items, {len(view) - pos} bytes are left")
        size = 4 + 4 * n + int(lens[lens != FAILED].sum(dtype=np.int64))
        if pos + size > len(view):
            raise ValueError(f"frame at byte {pos} needs {size} bytes, {len(view) - pos} are left")
        yield split_frame(view[pos : pos + size])
        pos += size


def items(lens: np.ndarray, data) -> list:
    """The items of a split frame: memoryviews into ``data``, None where FAILED."""
    out, start, data = [], 0, memoryview(data)
    for length in lens.tolist():
        if length == FAILED:
            out.append(None)
        else:
            out.append(data[start : start + length])
            start += length
    return out


def decode_frame(frame) -> list:
    """One frame -> its items: read-only memoryviews into ``frame``, None where FAILED.
    Raises ValueError if the frame's lengths do not add up to its size."""
    return items(*split_frame(frame))


def entry_messages(fields: dict) -> tuple[np.ndarray, memoryview]:
    """One stream entry's messages as (lengths, bytes back to back); ValueError if the entry
    has neither field or a broken frame."""
    p = fields.get(PAYLOAD)
    if p is not None:
        n = len(p)
        lens = _ONE.get(n)
        if lens is None:  # one shared read-only array per size: a plain entry costs no numpy call
            lens = np.array([n], dtype=np.uint32)
            lens.flags.writeable = False
            if len(_ONE) < 65536:
                _ONE[n] = lens
        return lens, memoryview(p)
    f = fields.get(FRAME)
    if f is not None:
        lens, data = split_frame(f)
        if (lens == FAILED).any():
            raise ValueError("a message frame with a FAILED length (only result frames may have one)")
        return lens, data
    raise ValueError(f"entry has neither a {PAYLOAD!r} nor a {FRAME!r} field: {sorted(fields)[:4]}")
