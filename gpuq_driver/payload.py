"""The one payload check of every entry point that takes messages (GpuQueue.enqueue,
StreamProducer.send/send_many, BatchProcessor.process): what counts as a message's bytes."""

from __future__ import annotations

from .errors import PayloadTypeError


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
