"""The host mirror (layout.py) against the one definition (device_src/gpuq_layout.cuh), and the
ring's index and wrap math.  The GPU's own view is checked by the layout probe at queue start."""

import ctypes
import re
import zlib
from pathlib import Path
from struct import unpack

import numpy as np
import pytest

from gpuq_driver import layout
from gpuq_driver.compiler import DEVICE_SRC

HEADER = (DEVICE_SRC / "gpuq_layout.cuh").read_text()


def header_defines() -> dict[str, int]:
    out = {}
    for name, value in re.findall(r"^#define (GPUQ_\w+) +(0x[0-9A-Fa-f]+|\d+)u?(?:ll)?\b", HEADER, re.M):
        out[name] = int(value, 0)
    return out


def test_constants_match_the_header():
    d = header_defines()
    expected = {
        "GPUQ_LAYOUT_VERSION": layout.LAYOUT_VERSION,
        "GPUQ_EMPTY": layout.EMPTY,
        "GPUQ_READY": layout.READY,
        "GPUQ_INFLIGHT": layout.INFLIGHT,
        "GPUQ_DONE": layout.DONE,
        "GPUQ_REQ_IN_VRAM": layout.REQ_IN_VRAM,
        "GPUQ_RUN": layout.RUN,
        "GPUQ_STOP_DRAIN": layout.STOP_DRAIN,
        "GPUQ_STOP_ABORT": layout.STOP_ABORT,
        "GPUQ_STOP_LEAVE": layout.STOP_LEAVE,
        "GPUQ_DOORBELL_STOP_SHIFT": layout.DOORBELL_STOP_SHIFT,
        "GPUQ_KERNEL_NOT_STARTED": layout.KERNEL_NOT_STARTED,
        "GPUQ_KERNEL_RUNNING": layout.KERNEL_RUNNING,
        "GPUQ_KERNEL_EXITED": layout.KERNEL_EXITED,
        "GPUQ_KERNEL_PARKED": layout.KERNEL_PARKED,
        "GPUQ_ERR_NONE": layout.ERR_NONE,
        "GPUQ_ERR_BAD_MSG_ID": layout.ERR_BAD_MSG_ID,
        "GPUQ_ERR_BAD_LEN": layout.ERR_BAD_LEN,
        "GPUQ_ERR_BAD_RESULT": layout.ERR_BAD_RESULT,
        "GPUQ_ERR_SHIFT": layout.ERR_SHIFT,
        "GPUQ_ERR_MASK": layout.ERR_MASK,
        "GPUQ_RESULT_FAILED": layout.RESULT_FAILED,
        "GPUQ_FAIL_CODE_SHIFT": layout.FAIL_CODE_SHIFT,
        "GPUQ_NO_MSG": layout.NO_MSG,
        "GPUQ_REQ_CHECKED": layout.REQ_CHECKED,
        "GPUQ_CHECK_SHIFT": layout.CHECK_SHIFT,
        "GPUQ_CHECK_MASK": layout.CHECK_MASK,
        "GPUQ_CHECK_BYTES": layout.CHECK_BYTES,
    }
    assert {k: d.get(k) for k in expected} == expected


def test_struct_sizes_match_the_static_asserts():
    asserted = {name: int(size) for name, size in re.findall(r"static_assert\(sizeof\((\w+)\) == (\d+)", HEADER)}
    mirror = {
        "GpuqSlotHeader": layout.SlotHeader,
        "GpuqCtrlHost": layout.CtrlHost,
        "GpuqCtrlDev": layout.CtrlDev,
        "GpuqDevState": layout.DevState,
        "GpuqKernelArgs": layout.KernelArgs,
    }
    assert set(asserted) == set(mirror)
    assert {n: ctypes.sizeof(mirror[n]) for n in asserted} == asserted


def test_field_order_matches_the_header():
    for cname, struct in (
        ("GpuqSlotHeader", layout.SlotHeader),
        ("GpuqCtrlDev", layout.CtrlDev),
        ("GpuqDevState", layout.DevState),
        ("GpuqKernelArgs", layout.KernelArgs),
    ):
        body = re.search(rf"struct (?:__align__\(\d+\) )?{cname} \{{(.*?)\}};", HEADER, re.S).group(1)
        fields = [m for m in re.findall(r"^\s*\w+\*? (\w+)(?:\[\d+\])?;", body, re.M)]
        assert fields == [f[0] for f in struct._fields_], cname


def test_result_flags_keep_state_error_and_failure_apart():
    assert layout.result_flags() == layout.DONE
    bad = layout.result_flags(layout.ERR_BAD_RESULT)
    assert bad & 0xFF == layout.DONE and (bad >> layout.ERR_SHIFT) & layout.ERR_MASK == layout.ERR_BAD_RESULT
    assert not bad & layout.RESULT_FAILED
    for code in (0, 1, 0x7FFF, 0xFFFF):
        f = layout.result_flags(failed=code)
        assert f & 0xFF == layout.DONE and (f >> layout.ERR_SHIFT) & layout.ERR_MASK == 0
        assert f & layout.RESULT_FAILED and f >> layout.FAIL_CODE_SHIFT == code and f < 1 << 32
    assert layout.ERR_MASK << layout.ERR_SHIFT & layout.RESULT_FAILED == 0  # disjoint bits


def test_slot_header_offsets():
    assert layout.expected_probe()[:5] == [layout.LAYOUT_VERSION, 16, 0, 4, 8]


@pytest.mark.parametrize("capacity", [2, 8, 1024, 1 << 22])
def test_slot_of_wraps_modulo_capacity(capacity):
    for msg_id in (0, 1, capacity - 1, capacity, capacity + 1, 7 * capacity + 3, (1 << 56) - 1):
        assert layout.slot_of(msg_id, capacity) == msg_id % capacity


def test_power_of_two_and_align():
    assert [n for n in range(0, 70) if layout.is_power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert [layout.align_up(n) for n in (0, 1, 128, 129)] == [0, 128, 128, 256]


def test_host_layout_regions_are_aligned_and_disjoint():
    lay = layout.HostLayout(capacity=64, slot_bytes=48, warps=5)
    spans = sorted((off, name) for name, off in lay.offsets.items())
    sizes = {
        "ctrl_host": 128,
        "ctrl_dev": 128,
        "req_hdr": 64 * 16,
        "res_hdr": 64 * 16,
        "warp_counters": 40,
        "req_data": 64 * 48,
        "res_data": 64 * 48,
    }
    for (off, name), nxt in zip(spans, spans[1:] + [(lay.nbytes, "end")]):
        assert off % layout.ALIGN == 0
        assert off + sizes[name] <= nxt[0]
    assert lay.vram_bytes == 64 * (16 + 48) + 5 * 8  # the slot ring, then the per-warp totals
    assert lay.vram_totals_offset == 64 * (16 + 48)


def test_request_stop_keeps_the_head():
    db = memoryview(bytearray(8)).cast("Q")
    db[0] = 12345
    layout.request_stop(db, layout.STOP_DRAIN)
    assert db[0] & layout.DOORBELL_HEAD_MASK == 12345 and db[0] >> layout.DOORBELL_STOP_SHIFT == layout.STOP_DRAIN
    layout.request_stop(db, layout.STOP_ABORT)
    assert db[0] & layout.DOORBELL_HEAD_MASK == 12345 and db[0] >> layout.DOORBELL_STOP_SHIFT == layout.STOP_ABORT


def test_crc_header_is_generated_from_layout():
    path = Path(__file__).resolve().parent.parent / "device_src" / "gpuq_crc.cuh"
    assert path.read_text() == layout.crc_header(), (
        "regenerate: python -c 'from gpuq_driver import layout; ...crc_header()'"
    )


def _warp_crc(data: bytes, seed: int, after: bytes = bytes(64)) -> int:
    """gpuq_queue.cu's warp_crc32 in Python: lane k (0 .. 15) holds the little-endian word k of the
    64-byte window (the initial register ~seed XORed into word 0's first min(n, 4) bytes) and looks
    up each of its nibbles that lies in the message at its distance from the end; the lanes' parts
    are XORed, and for n < 4 what the initial register did not shift out is added.  ``after``: what
    the 64-byte window holds past the message (the slot's older bytes; the device reads them too)."""
    table, n = layout.crc_nibble_tables(), len(data)
    words = list(unpack("<16I", data + after[: 64 - n]))
    c0 = ~seed & 0xFFFFFFFF
    words[0] ^= c0 if n >= 4 else c0 & ((1 << (8 * n)) - 1)
    acc = 0
    for k, word in enumerate(words):
        for q in range(8):
            j = 4 * k + q // 2
            if j < n:
                acc ^= table[((n - 1 - j) * 2 + (q & 1)) * 16 + ((word >> (4 * q)) & 15)]
    if n < 4:
        acc ^= c0 >> (8 * n)
    return ~acc & 0xFFFFFFFF


@pytest.mark.parametrize("n", list(range(65)))
def test_the_devices_crc_is_zlibs(n):
    rng = np.random.default_rng(n)
    for _ in range(10):
        data = rng.bytes(n)
        seed = int(rng.integers(0, 2**32))
        assert _warp_crc(data, seed) == _warp_crc(data, seed, rng.bytes(64)) == zlib.crc32(data, seed)


def test_slot_check_binds_msg_id_len_and_the_first_64_bytes():
    data = bytes(range(200))
    c = layout.slot_check(data, 7, 200)
    assert c == zlib.crc32(data[:64], 7 ^ 200 << 24) >> 8
    assert layout.slot_check(data, 8, 200) != c  # another msg_id
    assert layout.slot_check(data, 7, 199) != c  # another len
    assert layout.slot_check(data[:63] + b"x" + data[64:], 7, 200) != c  # a byte inside the window
    assert layout.slot_check(data[:100] + b"x" + data[101:], 7, 200) == c  # past it: read after the check
    word = layout.request_word(200, c)
    assert word & 0xFFFFFFFF == 200 and (word >> 32) & 0xF == layout.READY
    assert (word >> 32) & layout.REQ_CHECKED and (word >> 40) == c
    assert layout.request_word(5, None) == 5 | layout.READY << 32


def test_enqueue_makes_the_flags_word_of_slot_check():
    """enqueue's inlined flags word ((crc | 0xFF) ^ CHECK_LOW) is request_word's, for every length
    of the window and seeds past 32 bits (crc32 masks its seed)."""
    rng = np.random.default_rng(3)
    for n in range(65):
        data, seq = rng.bytes(n), int(rng.integers(0, 1 << 62)) * 3 + n
        flags = (zlib.crc32(data, seq ^ n << 24) | 0xFF) ^ layout.CHECK_LOW
        assert n | flags << 32 == layout.request_word(n, layout.slot_check(data, seq, n))
        assert flags & 0xFF == layout.READY | layout.REQ_CHECKED
