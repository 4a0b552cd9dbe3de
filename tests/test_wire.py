"""The wire format (gpuq_driver.streams.wire): frames of messages and results."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gpuq_driver.streams import decode_frame, encode_frame
from gpuq_driver.streams.wire import FAILED, join_frame


def test_frame_round_trip():
    items = [b"abc", None, b"", memoryview(b"xyz"), bytearray(b"q" * 1000), None, bytes(range(256))]
    frame = encode_frame(items)
    assert len(frame) == 4 + 4 * len(items) + 3 + 3 + 1000 + 256
    out = decode_frame(frame)
    assert [None if o is None else bytes(o) for o in out] == [None if i is None else bytes(i) for i in items]
    assert all(o is None or o.readonly for o in decode_frame(frame))
    assert np.frombuffer(frame, "<u4", 1 + len(items))[1:].tolist() == [3, FAILED, 0, 3, 1000, FAILED, 256]
    assert encode_frame([]) == b"\0\0\0\0" and decode_frame(b"\0\0\0\0") == []
    assert decode_frame(encode_frame([None, None])) == [None, None]
    assert [bytes(o) for o in decode_frame(encode_frame([b""] * 5))] == [b""] * 5
    rng = random.Random(9)
    many = [rng.randbytes(rng.randint(0, 40)) if rng.random() > 0.1 else None for _ in range(3000)]
    assert [None if o is None else bytes(o) for o in decode_frame(bytearray(encode_frame(many)))] == many


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"", "shorter than its 4-byte count"),
        (b"\x01\x00", "shorter than its 4-byte count"),
        (b"\x03\x00\x00\x00" + b"\x00" * 4, "says 3 items"),
        (encode_frame([b"abc", b"de"])[:-1], "add up to"),
        (encode_frame([b"abc", b"de"]) + b"!", "add up to"),
        (encode_frame([]) + b"garbage", "add up to"),
        (encode_frame([None]) + b"x", "add up to"),
        (b"\x01\x00\x00\x00\xfe\xff\xff\xff" + b"x" * 10, "add up to"),
    ],
)
def test_decode_frame_rejects_corrupted_frames(frame, why):
    with pytest.raises(ValueError, match=why):
        decode_frame(frame)


def test_join_frames_is_join_frame_for_each_entry():
    """The bridge's vectorised result frames: empty frames, FAILED items and empty items in place."""
    from gpuq_driver.streams.wire import join_frames

    counts = [3, 0, 2, 1, 0]
    lens = np.array([2, FAILED, 1, 0, 3, 2], np.uint32)
    data = np.frombuffer(b"abcdefgh", np.uint8)
    expected = [
        join_frame(lens[0:3], b"abc"),
        join_frame(lens[3:3], b""),
        join_frame(lens[3:5], b"def"),
        join_frame(lens[5:6], b"gh"),
        join_frame(lens[6:], b""),
    ]
    assert join_frames(counts, lens, data) == expected
    assert join_frames([], np.zeros(0, np.uint32), b"") == []
