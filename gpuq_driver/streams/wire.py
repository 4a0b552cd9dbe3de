"""How messages and results sit in stream entries: plain entries and frames.

A plain entry carries one message: fields ``{b"d": payload}``.  A *frame* entry carries many:
``{b"f": frame}``, where a frame is ``uint32 n | uint32 len[n] | the n payloads back to back``
(little-endian, no padding).  One Redis entry per message costs the server about 1 µs for XADD
and as much again for XREADGROUP and XACK (measured with INFO commandstats, benchmarks/NOTES.md),
which caps one Redis at a few hundred thousand entries/s; frames, like Kafka's record batches,
carry many messages per entry.  Redelivery, acks and deduplication work per entry; a message's
id is ``(entry id, index in the entry)``.

Results go to the result stream as one entry per completed batch, fields
``{source entry id: result frame}``; a length of ``FAILED`` (0xFFFFFFFF) marks a message that got
no result (payload larger than the slot, or a result larger than the slot).
"""

from __future__ import annotations

import numpy as np

PAYLOAD = b"d"
FRAME = b"f"
FAILED = 0xFFFFFFFF


def encode_frame(items) -> bytes:
    """``items`` (bytes-like, or None for a failed result) -> one frame (bytes)."""
    items = list(items)
    lens = np.fromiter((FAILED if p is None else len(p) for p in items), dtype="<u4", count=len(items))
    return b"".join([np.uint32(len(items)).astype("<u4").tobytes(), lens.tobytes(),
                     *(p for p in items if p is not None)])


def decode_frame(frame) -> list:
    """One frame -> its items: read-only memoryviews into ``frame``, None where FAILED.

    Raises ValueError if the frame's lengths do not add up to its size.
    """
    view = memoryview(frame).cast("B")
    if len(view) < 4:
        raise ValueError(f"frame of {len(view)} bytes is shorter than its 4-byte count")
    n = int(np.frombuffer(view, "<u4", 1)[0])
    if len(view) < 4 + 4 * n:
        raise ValueError(f"frame says {n} items but has {len(view)} bytes")
    lens = np.frombuffer(view, "<u4", n, 4)
    sizes = np.where(lens == FAILED, 0, lens).astype(np.int64)
    ends = (4 + 4 * n) + np.cumsum(sizes)
    if n and ends[-1] != len(view):
        raise ValueError(f"frame lengths add up to {int(ends[-1])} bytes, the frame has {len(view)}")
    out, start = [], 4 + 4 * n
    for length, end in zip(lens.tolist(), ends.tolist()):
        out.append(None if length == FAILED else view[start:end])
        start = end
    return out


def entry_payloads(fields: dict) -> list:
    """The messages of one stream entry's field dict (plain or frame); ValueError if neither."""
    p = fields.get(PAYLOAD)
    if p is not None:
        return [p]
    f = fields.get(FRAME)
    if f is not None:
        return decode_frame(f)
    raise ValueError(f"entry has neither a {PAYLOAD!r} nor a {FRAME!r} field: {sorted(fields)[:4]}")
