"""The one payload check of every entry point that takes messages (GpuQueue.enqueue,
StreamProducer.send/send_many, BatchProcessor.process): what counts as a message's bytes; and
the one check of message sizes given apart from the bytes (GpuQueue.enqueue_many's and
Reservation.commit's ``lengths``, BatchProcessor.process_packed's ``lens``)."""

from __future__ import annotations

import numpy as np

from .errors import PayloadError, PayloadTypeError


def byte_view(payload, name: str = "payload") -> bytes | memoryview:
    """``payload`` itself if it is ``bytes``, else a flat byte view of it: any C-contiguous buffer
    of plain data (bytearray, memoryview, numpy arrays of numbers; their bytes, ``nbytes`` long).

    Raises PayloadTypeError (a TypeError) naming ``name`` for anything else: objects without the
    buffer protocol (str, int, None), numpy dtypes it cannot carry (datetime64), non-contiguous
    views, and arrays of object pointers (dtype=object), whose bytes would be addresses, not data.
    """
    if type(payload) is bytes:
        return payload
    try:
        view = memoryview(payload)
    except (TypeError, ValueError) as exc:  # ValueError: numpy dtypes the buffer protocol cannot carry
        raise PayloadTypeError(
            f"{name} must be a bytes-like object (bytes, bytearray, memoryview, numpy array of plain "
            f"numbers), not {type(payload).__name__} ({exc})"
        ) from None
    if not view.c_contiguous:
        raise PayloadTypeError(f"{name} must be C-contiguous")
    if "O" in view.format or "P" in view.format:
        raise PayloadTypeError(f"{name} of format {view.format!r} holds object pointers, not data")
    if view.nbytes == 0:
        return memoryview(b"")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def byte_views(payloads, one: str = "send()") -> list:
    """:func:`byte_view` of each item of ``payloads`` (a list or other iterable of messages), named
    ``payload 0``, ``payload 1``, ... in errors.  Raises PayloadTypeError for one message passed as
    the list (bytes, bytearray, memoryview, str: its items would be single bytes), pointing to
    ``one``, the call that takes one message, and for anything that is not iterable."""
    if isinstance(payloads, (bytes, bytearray, memoryview, str)):
        raise PayloadTypeError(
            f"payloads must be a list of messages, not one {type(payloads).__name__} object "
            f"(its items would be sent as single bytes); for one message use {one}"
        )
    try:
        return [byte_view(p, f"payload {i}") for i, p in enumerate(payloads)]
    except TypeError as exc:
        if isinstance(exc, PayloadTypeError):
            raise
        raise PayloadTypeError(f"payloads must be a list of messages, not {type(payloads).__name__}") from None


def lengths_array(
    lengths,
    n_expected: int | None,
    limit: int,
    what: str,
    name: str = "lengths",
    counted: str = "payloads has {} messages",
) -> np.ndarray:
    """``lengths`` (sizes in bytes) as a uint32 array, each 0 .. ``limit`` (``what`` says which
    limit that is, e.g. ``"slot_bytes"``); ``n_expected`` entries unless None.  Raises
    PayloadTypeError naming ``name`` for anything but a 1-D array of integers (floats, bools and
    strings would be truncated or misread), PayloadError for a wrong count, a negative size or one
    above ``limit`` (``counted``: what ``n_expected`` counts, for the message)."""
    try:
        lens = np.asarray(lengths)
    except Exception as exc:  # noqa: BLE001 - whatever numpy refuses
        raise PayloadTypeError(f"{name} must be an array of ints: {exc}") from None
    if lens.ndim == 1 and lens.size == 0:
        lens = lens.astype(np.uint32)  # [] is float64 to numpy
    if lens.ndim != 1 or lens.dtype.kind not in "iu":
        raise PayloadTypeError(
            f"{name} must be a 1-D array of integers (uint32), not {lens.ndim}-D of dtype {lens.dtype}"
        )
    if n_expected is not None and len(lens) != n_expected:
        raise PayloadError(f"{name} has {len(lens)} entries; {counted.format(n_expected)}")
    if len(lens):
        lo, hi = lens.min(), lens.max()
        if lo < 0:
            i = int(np.argmax(lens < 0))
            raise PayloadError(f"{name}[{i}]={int(lens[i])} is negative")
        if hi > limit:
            i = int(np.argmax(lens > limit))
            raise PayloadError(f"message {i} is {int(lens[i])} bytes; {what} is {limit} (the limit per message)")
    return lens.astype(np.uint32, copy=False)
