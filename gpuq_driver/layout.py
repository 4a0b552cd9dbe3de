"""Host mirror of ``device_src/gpuq_layout.cuh`` (ctypes), and the ring's index math.

The structs and constants here must match the header byte for byte.  Two checks hold them
together: ``tests/test_layout.py`` reads every ``#define GPUQ_*`` and ``static_assert(sizeof...)``
from the header and compares (no GPU needed), and :func:`expected_probe` is compared with what the
``gpuq_layout_probe`` kernel reports from the device before the queue starts.
"""

from __future__ import annotations

import ctypes
import zlib

from .errors import ConfigError, check_int

LAYOUT_VERSION = 7

EMPTY, READY, INFLIGHT, DONE = 0, 1, 2, 3
REQ_IN_VRAM = 0x10  # request flags: READY | this = the payload is already in the VRAM slot (enqueue_device)
RUN, STOP_DRAIN, STOP_ABORT, STOP_LEAVE = 0, 1, 2, 3
KERNEL_NOT_STARTED, KERNEL_RUNNING, KERNEL_EXITED, KERNEL_PARKED = 0, 1, 2, 3
ERR_NONE, ERR_BAD_MSG_ID, ERR_BAD_LEN, ERR_BAD_RESULT = 0, 1, 2, 3
ERROR_NAMES = {ERR_BAD_MSG_ID: "BAD_MSG_ID", ERR_BAD_LEN: "BAD_LEN", ERR_BAD_RESULT: "BAD_RESULT"}
# A result's flags (res_hdr): DONE | protocol error << ERR_SHIFT | RESULT_FAILED | code << FAIL_CODE_SHIFT
ERR_SHIFT, ERR_MASK = 8, 0x7F
RESULT_FAILED = 0x8000  # the plugin failed the message (GPUQ_FAIL(code)); its code in the top 16 bits
FAIL_CODE_SHIFT = 16
NO_MSG = 0xFFFFFFFFFFFFFFFF
DOORBELL_STOP_SHIFT = 56
DOORBELL_HEAD_MASK = (1 << DOORBELL_STOP_SHIFT) - 1

# A request's flags (req_hdr): READY | REQ_CHECKED | check << CHECK_SHIFT (gpuq_layout.cuh, "One read")
REQ_CHECKED = 0x20  # the header carries the slot check: the front warp may serve it from one read
CHECK_SHIFT, CHECK_MASK = 8, 0xFFFFFF
CHECK_BYTES = 64  # the check covers the payload's first min(len, 64) bytes
CRC_POLY = 0xEDB88320  # zlib's CRC-32 (reflected)

HEADER_BYTES = 16
ALIGN = 128  # each region of the mapped block starts on its own 128-byte line


class SlotHeader(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("msg_id", ctypes.c_uint64)]


class CtrlHost(ctypes.Structure):
    """doorbell = head | (stop << DOORBELL_STOP_SHIFT); written by the host only."""

    _fields_ = [("doorbell", ctypes.c_uint64), ("pad", ctypes.c_uint64 * 15)]


class CtrlDev(ctypes.Structure):
    """Device-written: kernel state, first protocol error, lease counters (see the header)."""

    _fields_ = [
        ("state", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
        ("error_msg_id", ctypes.c_uint64),
        ("layout_version", ctypes.c_uint32),
        ("warps", ctypes.c_uint32),
        ("leases_begun", ctypes.c_uint64),
        ("leases_ended", ctypes.c_uint64),
        ("leases_leaving", ctypes.c_uint64),
        ("spec_reads", ctypes.c_uint64),
        ("spec_retries", ctypes.c_uint64),
        ("front", ctypes.c_uint64),
        ("pad", ctypes.c_uint64 * 7),
    ]


class DevState(ctypes.Structure):
    _fields_ = [
        ("claim", ctypes.c_uint64),
        ("pad0", ctypes.c_uint64 * 15),
        ("head", ctypes.c_uint64),
        ("stop", ctypes.c_uint32),
        ("exited", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
        ("begun", ctypes.c_uint32),
        ("lease_start", ctypes.c_uint64),
        ("leases", ctypes.c_uint64),
        ("leaving", ctypes.c_uint32),
        ("unchecked", ctypes.c_uint32),
        ("spec_reads", ctypes.c_uint64),
        ("spec_retries", ctypes.c_uint64),
        ("front", ctypes.c_uint64),
        ("grab", ctypes.c_uint64),
        ("poll_t", ctypes.c_uint64),
        ("poll_per", ctypes.c_uint64),
        ("pad1", ctypes.c_uint64 * 4),
    ]


class KernelArgs(ctypes.Structure):
    """``GpuqKernelArgs``, the persistent kernel's one by-value argument."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ctrl_host",
            "ctrl_dev",
            "req_hdr",
            "req_data",
            "res_hdr",
            "res_data",
            "warp_counters",
            "vram_slots",
            "dev",
            "warp_totals",
            "lease_ns",
        )
    ] + [
        (name, ctypes.c_uint32)
        for name in ("capacity", "slot_bytes", "front_backoff_ns", "idle_backoff_ns", "one_read", "scouts")
    ]


def _off(struct, name: str) -> int:
    return getattr(struct, name).offset


def expected_probe() -> list[int]:
    """What ``gpuq_layout_probe`` must report, in its order (see gpuq_queue.cu)."""
    return [
        LAYOUT_VERSION,
        ctypes.sizeof(SlotHeader),
        _off(SlotHeader, "len"),
        _off(SlotHeader, "flags"),
        _off(SlotHeader, "msg_id"),
        ctypes.sizeof(CtrlHost),
        _off(CtrlHost, "doorbell"),
        ctypes.sizeof(CtrlDev),
        _off(CtrlDev, "state"),
        _off(CtrlDev, "error"),
        _off(CtrlDev, "error_msg_id"),
        _off(CtrlDev, "layout_version"),
        _off(CtrlDev, "warps"),
        _off(CtrlDev, "leases_begun"),
        _off(CtrlDev, "leases_ended"),
        _off(CtrlDev, "leases_leaving"),
        _off(CtrlDev, "spec_reads"),
        _off(CtrlDev, "spec_retries"),
        _off(CtrlDev, "front"),
        ctypes.sizeof(DevState),
        ctypes.sizeof(KernelArgs),
        _off(KernelArgs, "warp_totals"),
        _off(KernelArgs, "lease_ns"),
        _off(KernelArgs, "capacity"),
        _off(KernelArgs, "slot_bytes"),
        _off(KernelArgs, "front_backoff_ns"),
        _off(KernelArgs, "idle_backoff_ns"),
        _off(KernelArgs, "one_read"),
        _off(KernelArgs, "scouts"),
    ]


def request_stop(doorbell, mode: int) -> None:
    """Set the stop request (STOP_DRAIN / STOP_ABORT) in the doorbell, keeping its head.

    ``doorbell`` is a one-item ``Q`` memoryview over GpuqCtrlHost.doorbell.  The host is the
    field's only writer: call it with the producers stopped.
    """
    doorbell[0] = (doorbell[0] & DOORBELL_HEAD_MASK) | (mode << DOORBELL_STOP_SHIFT)


def slot_check(payload, msg_id: int, n: int) -> int:
    """The 24-bit check of a request (gpuq_layout.cuh, "One read"): the top 24 bits of
    ``zlib.crc32(payload[:min(n, 64)], seed)`` with ``seed = (msg_id ^ n << 24) mod 2**32``, for a
    payload of ``n`` bytes (``enqueue`` adds it to messages of at most 64 bytes, the only ones
    served from one read).  Binds the header (msg_id and len, through the seed) to the bytes the
    front warp reads with it, so a torn or stale read fails it.  ``payload`` is bytes-like.  The
    top bits, so that ``enqueue`` makes the flags word in two small-int operations:
    ``(crc | 0xFF) ^ CHECK_LOW`` (~0.2 µs less than placing the low bits, host_steps.py); zlib's
    crc32 of 64 bytes alone costs ~0.2 µs on the H200 machines (benchmarks/NOTES.md)."""
    seed = (msg_id ^ n << 24) & 0xFFFFFFFF
    return zlib.crc32(payload if n <= CHECK_BYTES else payload[:CHECK_BYTES], seed) >> CHECK_SHIFT


# A checked request's flags word is (crc | 0xFF) ^ CHECK_LOW = check << CHECK_SHIFT | READY | REQ_CHECKED
CHECK_LOW = 0xFF ^ (READY | REQ_CHECKED)


def request_word(n: int, check: int | None) -> int:
    """A request header's first word (len | flags << 32): READY, with the slot check if given."""
    flags = READY if check is None else READY | REQ_CHECKED | (check << CHECK_SHIFT)
    return n | (flags << 32)


def crc_nibble_tables() -> list[int]:
    """The device's CRC table (device_src/gpuq_crc.cuh, generated from this), 2,048 words: entry
    ``(d * 2 + h) * 16 + v`` is the CRC-32 register (zlib's reflected polynomial, zero initial
    value, no final inversion) after a byte holding nibble ``v`` in its low (h = 0) or high (h = 1)
    half and then ``d`` zero bytes (d = 0 .. 63).  The register is linear in the message's bits, so
    the CRC of up to 64 bytes is the XOR of one entry per nibble, looked up side by side by the
    lanes of a warp (gpuq_queue.cu, warp_crc32; tests/test_layout.py runs the same sum in Python
    against zlib.crc32)."""
    t0 = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ CRC_POLY if c & 1 else c >> 1
        t0.append(c)
    out = []
    for d in range(CHECK_BYTES):
        for h in range(2):
            for v in range(16):
                c = t0[v << (4 * h)]
                for _ in range(d):
                    c = t0[c & 0xFF] ^ (c >> 8)
                out.append(c)
    return out


def crc_header() -> str:
    """The text of device_src/gpuq_crc.cuh (tests/test_layout.py checks the file matches)."""
    words = crc_nibble_tables()
    rows = "\n".join("  " + " ".join(f"0x{w:08x}u," for w in words[i : i + 8]) for i in range(0, len(words), 8))
    return (
        "// gpuq_crc.cuh -- generated by gpuq_driver.layout.crc_header(); do not edit (test_layout.py checks it).\n"
        "// zlib's CRC-32 by nibbles: entry (d * 2 + h) * 16 + v is the register (zero initial value, no\n"
        "// final inversion) after a byte holding nibble v in its low (h = 0) or high (h = 1) half, then d\n"
        '// zero bytes: the slot check of gpuq_layout.cuh ("One read"), one lookup per nibble.\n'
        "#pragma once\n\n"
        f"__device__ __align__(16) const uint32_t kCrcNibbles[{len(words)}] = {{\n{rows}\n}};\n"
    )


def result_flags(code: int = ERR_NONE, failed: int | None = None) -> int:
    """A result header's flags word: DONE, a protocol error ``code`` (GPUQ_ERR_*), or the plugin's
    failure with code ``failed`` (0 .. 65535)."""
    flags = DONE | (code << ERR_SHIFT)
    if failed is not None:
        flags |= RESULT_FAILED | (failed << FAIL_CODE_SHIFT)
    return flags


def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (a power of two)."""
    return (n + a - 1) & ~(a - 1)


def slot_of(msg_id: int, capacity: int) -> int:
    """Slot index of ``msg_id`` in a ring of ``capacity`` (a power of two) slots."""
    return msg_id & (capacity - 1)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


MAX_SLOT_BYTES = 1 << 20


def check_slot_bytes(value) -> int:
    """The one slot-size rule of the queue's ring and the batch path: an int, a multiple of 16
    (slots are read and written in 16-byte vectors), 16 .. 1,048,576 bytes.  Raises ConfigError
    naming ``slot_bytes`` and the limit."""
    value = check_int("slot_bytes", value, 16, MAX_SLOT_BYTES)
    if value % 16:
        raise ConfigError(f"slot_bytes={value} must be a multiple of 16")
    return value


def check_threads_per_block(value) -> int:
    """Block size of the kernels: whole warps (a multiple of 32), 32 .. 1024 threads.  Raises ConfigError."""
    value = check_int("threads_per_block", value, 32, 1024)
    if value % 32:
        raise ConfigError(f"threads_per_block={value} must be a multiple of 32")
    return value


class HostLayout:
    """Byte offsets of each region inside the one mapped pinned block of a queue.

    Regions (each 128-byte aligned): ctrl_host (128 B), ctrl_dev (128 B), req_hdr and res_hdr
    (capacity × 16 B), warp_counters (warps × 8 B), req_data and res_data (capacity × slot_bytes).
    """

    def __init__(self, capacity: int, slot_bytes: int, warps: int):
        self.capacity, self.slot_bytes, self.warps = capacity, slot_bytes, warps
        off = 0
        self.offsets: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        for name, size in (
            ("ctrl_host", ctypes.sizeof(CtrlHost)),
            ("ctrl_dev", ctypes.sizeof(CtrlDev)),
            ("req_hdr", capacity * HEADER_BYTES),
            ("res_hdr", capacity * HEADER_BYTES),
            ("warp_counters", warps * 8),
            ("req_data", capacity * slot_bytes),
            ("res_data", capacity * slot_bytes),
        ):
            self.offsets[name], self.sizes[name] = off, size
            off = align_up(off + size)
        self.nbytes = off
        self.vram_bytes = capacity * (HEADER_BYTES + slot_bytes)  # the VRAM slot ring
        self.vram_totals_offset = self.vram_bytes  # then warp_totals: warps × 8 B
        self.vram_bytes += warps * 8

    def view(self, mem: memoryview, region: str, fmt: str = "B") -> memoryview:
        """The ``region`` of the mapped block ``mem`` (a ``B`` memoryview), cast to ``fmt``.

        Header rings cast to ``"Q"`` hold two words per slot: ``[2*slot]`` = len | flags << 32,
        ``[2*slot + 1]`` = msg_id.  ``"ctrl_host"`` as ``"Q"``: ``[0]`` is the doorbell.
        """
        off = self.offsets[region]
        return mem[off : off + self.sizes[region]].cast(fmt)
