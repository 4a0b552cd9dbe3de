"""Device arrays in and out: results lent to CuPy / PyTorch in VRAM, device arrays enqueued without a
host copy (``view_results_device``, ``enqueue_device``; ``QueueConfig(result_memory="device")``).

Out.  With ``result_memory="device"`` the result payload ring (``res_data``) is allocated in VRAM;
the result headers stay in mapped pinned memory, where the host polls them.  ``view_results_device``
lends rows of that ring as a :class:`DeviceArray`, which CuPy and PyTorch take without a copy
through ``__cuda_array_interface__`` (version 3) or DLPack (``__dlpack__`` / ``__dlpack_device__``).
No stream synchronisation is needed to read them, on any stream: the kernel writes the result data,
then ``__threadfence_system()``, then releases the header's ``msg_id`` word at system scope, and the
host has read that word (the view is made only once every result of the range is done) before it
hands the array out; any work the consumer queues afterwards happens after the data were written.
So the CUDA array interface says ``"stream": None`` and ``__dlpack__`` ignores its ``stream``.
The host-copy calls (``take_results``, ``try_dequeue_result``, ``wait_result``, ``take_ready``)
still work in that mode: they copy from VRAM with ``cuMemcpy2DAsync`` on the queue's own
non-blocking stream and wait for that stream only, through the mapped ``res_data`` region, which
serves as their staging buffer.  ``view_results`` (host memory views) is refused there.

Lifetime.  A view's slots stay held (no later message reuses them) until **both** the view is
released and every array exported from it is gone: the :class:`DeviceArray` itself (which CuPy and
torch keep alive through the CUDA array interface while their array lives) and each DLPack capsule
(until its consumer calls the deleter).  Work queued on a stream that reads the data must be done
before the slots free: ``release(stream=s)`` waits for stream ``s`` first (``cuStreamSynchronize``
of that stream only); otherwise synchronise it yourself before dropping the last array.  Nothing
exported may be used after ``close()``: the VRAM is freed then.

In.  ``enqueue_device`` copies the rows of a device array device to device into the kernel's VRAM
staging slots (``vram_slots``; slot i's payload at ``16 + i * (16 + slot_bytes)``) with one
``cuMemcpy2DAsync`` per contiguous run of slots (two where the batch wraps the ring's end) on a
stream, records one event there and waits for it (``cuEventSynchronize``, never the context), then
writes the request headers with ``GPUQ_REQ_IN_VRAM`` and stores the doorbell once, as
``enqueue_many`` does: no CUDA call per message, and the host request ring is not touched.  The
kernel, seeing the flag, does not copy the payload from the host.

On the simulator (``backend="sim"``) "device memory" is host memory (numpy arrays that the simulated
kernel reads and writes as VRAM); the same host code runs, the arrays are kDLCPU and expose
``__array_interface__`` instead of the CUDA array interface, and ``enqueue_device`` takes numpy
arrays (or anything with ``__array_interface__`` or a kDLCPU ``__dlpack__``).
"""

from __future__ import annotations

import ctypes
import warnings
import weakref

import numpy as np

from .bulk import ResultView, _release_soon, _segments
from .errors import ConfigError, PayloadError, PayloadTypeError, QueueClosed, check_seconds
from .layout import HEADER_BYTES, READY, REQ_IN_VRAM
from .payload import lengths_array

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {
    KDL_CPU: "kDLCPU",
    KDL_CUDA: "kDLCUDA",
    KDL_CUDA_HOST: "kDLCUDAHost",
    KDL_CUDA_MANAGED: "kDLCUDAManaged",
}
_VRAM_WORD = np.uint64((READY | REQ_IN_VRAM) << 32)


# -- DLPack (dlpack.h, v1.0) with ctypes -----------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # in elements; NULL = C-contiguous
        ("byte_offset", ctypes.c_uint64),
    ]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*deleter)(DLManagedTensor[Versioned]*)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


# Our own prototypes of the capsule API (ctypes.pythonapi's are shared with every other library).
_api = ctypes.pythonapi
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", _api)
)
_valid_raw = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_IsValid", _api))
_pointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))
_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_IsValid", _api))
_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))
_set_name = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_SetName", _api))
# The capsule keeps a pointer to its name: these bytes live as long as the module.
_NAME, _USED = b"dltensor", b"used_dltensor"
_NAME_V, _USED_V = b"dltensor_versioned", b"used_dltensor_versioned"

_exports: dict[int, tuple] = {}
"""address of each DLManagedTensor[Versioned] handed out -> every ctypes object it points into and
the DeviceArray it exports (kept alive until its deleter runs)."""


def _delete_export(address: int) -> None:
    _exports.pop(address, None)  # the DeviceArray may now be collected, which may free its slots


_DELETE_EXPORT = _DELETER(_delete_export)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule: int) -> None:
    """A capsule collected unconsumed (its name unchanged) deletes its tensor; a consumed one
    ("used_..." name) was handed over, and its consumer calls the deleter."""
    for name in (_NAME, _NAME_V):
        if _valid_raw(capsule, name):
            _delete_export(_pointer_raw(capsule, name))


def _export_capsule(owner, ptr: int, shape: tuple[int, int], strides: tuple[int, int], device, versioned: bool):
    """A DLPack capsule of the uint8 [rows, cols] array at ``ptr`` (strides in elements = bytes)."""
    managed = DLManagedTensorVersioned() if versioned else DLManagedTensor()
    shp, st = (ctypes.c_int64 * 2)(*shape), (ctypes.c_int64 * 2)(*strides)
    t = managed.dl_tensor
    t.data, t.device, t.ndim, t.dtype = ptr, DLDevice(*device), 2, DLDataType(1, 8, 1)  # kDLUInt, 8 bits
    t.shape, t.strides, t.byte_offset = ctypes.cast(shp, ctypes.POINTER(ctypes.c_int64)), st, 0
    managed.deleter = _DELETE_EXPORT
    if versioned:
        managed.version = DLPackVersion(1, 0)
    address = ctypes.addressof(managed)
    _exports[address] = (managed, shp, st, owner)
    return _capsule_new(address, _NAME_V if versioned else _NAME, ctypes.cast(_capsule_destructor, ctypes.c_void_p))


# -- out: the result ring in device memory -----------------------------------------------------------


class DeviceArray:
    """``[rows, slot_bytes]`` uint8 rows of the result ring in device memory (a view's ``data``):
    hand it to ``cupy.asarray`` / ``torch.as_tensor(..., device="cuda")`` (the CUDA array interface)
    or ``cupy.from_dlpack`` / ``torch.from_dlpack`` (DLPack); no copy either way.

    ptr:    the device address of row 0 (int); shape: (rows, slot_bytes); strides: (slot_bytes, 1)
    bytes; device: the DLPack device, (2 = kDLCUDA, ordinal), or (1 = kDLCPU, 0) on the simulator,
    which exposes ``__array_interface__`` (numpy) instead of ``__cuda_array_interface__``.
    Writable (the slots are yours until released; the queue never reads them back).  While this
    object or a DLPack capsule of it lives, the view's slots are not reused (module docstring).
    owner: the GpuQueue whose memory it is (None: no owner to check); once it is closed the memory
    is freed, and the array interfaces and ``__dlpack__`` raise QueueClosed instead of handing out
    a dangling pointer (arrays exported before then are invalid: do not use them).
    """

    __slots__ = ("ptr", "shape", "strides", "device", "_owner", "__weakref__")

    def __init__(self, ptr: int, rows: int, slot_bytes: int, device: tuple[int, int], owner=None):
        self.ptr, self.shape, self.strides, self.device = ptr, (rows, slot_bytes), (slot_bytes, 1), device
        self._owner = owner

    def _interface(self) -> dict:
        self._check_open()
        return {"version": 3, "shape": self.shape, "typestr": "|u1", "data": (self.ptr, False), "strides": self.strides}

    def _check_open(self) -> None:
        if self._owner is not None and self._owner._res_hdr is None:
            raise QueueClosed("queue is closed: the memory of this DeviceArray is freed, it cannot be exported")

    @property
    def __cuda_array_interface__(self) -> dict:
        """Version 3; ``"stream": None``: no synchronisation is needed (module docstring)."""
        if self.device[0] != KDL_CUDA:
            raise AttributeError("a simulator's array is in host memory: it has __array_interface__")
        return {**self._interface(), "stream": None}

    @property
    def __array_interface__(self) -> dict:
        """The simulator only (its "device" memory is host memory)."""
        if self.device[0] != KDL_CPU:
            raise AttributeError("a device array has __cuda_array_interface__, not __array_interface__")
        return self._interface()

    def __dlpack_device__(self) -> tuple[int, int]:
        """(2 = kDLCUDA, device ordinal); (1 = kDLCPU, 0) on the simulator."""
        return self.device

    def __dlpack__(self, stream=None, *, max_version=None, dl_device=None, copy=None):
        """A DLPack capsule of the rows (no copy): "dltensor_versioned" (DLPack 1.0) when the caller
        accepts ``max_version >= (1, 0)``, else the legacy "dltensor".

        stream: the consumer's stream (an int, or None); accepted and not waited on: the data were
        complete before this array existed (module docstring).  copy=True and a ``dl_device`` other
        than ``__dlpack_device__()`` raise BufferError (this array is never copied or moved);
        QueueClosed once its queue is closed.
        """
        self._check_open()
        if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int)):
            raise TypeError(f"stream must be an int or None, not {type(stream).__name__}")
        if copy:
            raise BufferError("copy=True: a result view's DeviceArray is lent in place, never copied")
        if dl_device is not None and tuple(dl_device) != tuple(self.device):
            raise BufferError(f"dl_device={tuple(dl_device)}: this array is on {self.device} and is never moved")
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        return _export_capsule(self, self.ptr, self.shape, self.strides, self.device, versioned)

    def __repr__(self) -> str:
        where = f"{_DEVICE_NAMES.get(self.device[0])}:{self.device[1]}"
        return f"<DeviceArray uint8 {self.shape} at 0x{self.ptr:x} on {where}>"


class DeviceResultView(ResultView):
    """Results lent in VRAM by ``GpuQueue.view_results_device``: a ResultView whose ``data`` is a
    :class:`DeviceArray` (``[n, slot_bytes]`` uint8 in device memory) instead of a host array.

    first, lengths (uint32[n]: result sizes, FAILED where flagged), flags, msg_ids, ``len(v)``: as
    ResultView.  ``data`` raises GpuqError once released.  ``release(stream=None)`` gives the slots
    back; they are actually freed (``freed`` becomes True) once the view is released **and** every
    exported array is gone: the DeviceArray object (CuPy and torch hold it while their arrays live)
    and each DLPack capsule (until its consumer's deleter runs).  Until then the ring cannot reuse
    them (it frees in msg_id order: an array kept long holds up the producers; QueueFull then names
    the view).  Do not use exported arrays after ``close()``: the VRAM is freed.
    """

    __slots__ = ("_fin",)

    def __init__(self, q, first: int, data: DeviceArray, lengths: np.ndarray, flags: np.ndarray):
        super().__init__(q, first, data, lengths, flags)
        self._rec.call = "view_results_device"
        # the slots free when the array is collected: the view dropped it, and no export holds it
        self._fin = weakref.finalize(data, _release_soon, q, self._rec)
        self._fin.atexit = False

    @property
    def freed(self) -> bool:
        """True once the slots are free: released, and every exported array gone."""
        return not self._fin.alive

    def release(self, stream=None) -> None:
        """Give the slots back: now, or once the last exported array is gone (see the class).
        stream: a stream whose queued work reads the data (an int handle, a cupy.cuda.Stream or
        torch.cuda.Stream): waited for first (``cuStreamSynchronize`` of that stream only).
        Idempotent; does nothing after ``close()``.  Raises ConfigError (a bad stream), CudaError."""
        if not self._held:
            return
        q = self._q
        if stream is not None and q._res_hdr is not None:
            q._kernel.dmem.sync_stream(stream_handle(stream))
        self._held = False
        self._rec.exported = True  # from now on only exports hold the slots (QueueFull says so)
        self._data = None  # its last reference but the exports': the finalizer frees the slots now
        if q._dropped:  # the finalizer found the consumer lock busy: free them here, waiting for it
            with q._clock:
                q._release_dropped()

    def __del__(self):
        if getattr(self, "_held", False):
            self._held = False  # the array goes with the view (unless exported): its finalizer frees
            self._rec.exported = True
            warnings.warn(
                f"a DeviceResultView of msg_ids {self.first}..{self.first + self._n - 1} was dropped unreleased: "
                "released (its slots free once every exported array is gone)",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        state = "held" if self._held else "freed" if self.freed else "released, exports alive"
        return f"<DeviceResultView msg_ids {self.first}..{self.first + self._n - 1} ({self._n}) {state}>"


# -- the device memory of a queue's kernel ---------------------------------------------------------


def stream_handle(stream) -> int:
    """A stream given as an int handle (1 = legacy default, 2 = per-thread default), a
    ``cupy.cuda.Stream`` (``.ptr``), a ``torch.cuda.Stream`` (``.cuda_stream``) or a cuda-python
    ``CUstream`` -> its int handle.  Raises ConfigError naming ``stream`` for anything else."""
    if isinstance(stream, int) and not isinstance(stream, bool):
        handle = stream
    else:
        handle = None
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            value = getattr(stream, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                handle = value
                break
        if handle is None and type(stream).__name__ == "CUstream":
            handle = int(stream)
    if handle is not None and handle < 0:
        raise ConfigError(f"stream={handle} is not a stream handle: an int >= 0 (1 = legacy default, 2 = per-thread)")
    if handle is None:
        raise ConfigError(
            f"stream must be an int stream handle (>= 0), a cupy.cuda.Stream, a torch.cuda.Stream or None, "
            f"not {type(stream).__name__}"
        )
    return handle


class CudaMemory:
    """The GPU side of device arrays for one queue (kernel.PersistentKernel.dmem): the VRAM slot
    ring's and result ring's addresses, and two ``CU_STREAM_NON_BLOCKING`` streams with an event,
    all made before the first launch: ``in_stream`` (enqueue_device's default, under the producer
    lock) and ``out_stream`` (the host copies of results, under the consumer lock)."""

    def __init__(self, ctx, ordinal: int, vram_slots: int, results: int):
        from . import driver

        self.driver, self.ctx = driver, ctx
        self.dl_device = (KDL_CUDA, ordinal)
        self.vram_slots, self.results = vram_slots, results
        self._in, self._out, self._event = driver.Stream(ctx), driver.Stream(ctx), driver.Event(ctx)
        self.in_stream, self.out_stream = int(self._in.handle), int(self._out.handle)
        self.resources = [self._in, self._out, self._event]

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int):
        """``cuMemcpy2DAsync`` on ``stream`` (unified addresses)."""
        self.ctx.make_current()
        self.driver.copy_2d_async(dst, dst_pitch, src, src_pitch, width, height, stream)

    def wait(self, stream: int) -> None:
        """Wait for the work queued on ``stream`` so far: record the event there and synchronise it."""
        self._event.record(stream)
        self._event.synchronize()

    def read(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """A 2-D copy from VRAM to pinned host memory on ``out_stream``, waited for (that stream only)."""
        self.copy_2d(dst, dst_pitch, src, src_pitch, width, height, self.out_stream)
        self._out.synchronize()

    def sync_stream(self, stream: int) -> None:
        """``cuStreamSynchronize`` of that stream only."""
        self.ctx.make_current()
        self.driver.stream_synchronize(stream)


def _host_array(ptr: int, shape: tuple[int, int], strides: tuple[int, int]) -> np.ndarray:
    """The uint8 array at host address ``ptr`` (the simulator's "device" memory)."""
    rows, cols = shape
    span = (rows - 1) * strides[0] + (cols - 1) * strides[1] + 1 if rows and cols else 0
    base = np.frombuffer((ctypes.c_ubyte * max(span, 1)).from_address(ptr), np.uint8)
    return np.lib.stride_tricks.as_strided(base, shape, strides)


class SimMemory:
    """The simulator's stand-in for CudaMemory (sim.SimulatedKernel.dmem): "VRAM" is numpy arrays in
    host memory, addressed by their host addresses; copies are numpy copies, done at once."""

    in_stream = out_stream = 0

    def __init__(self, vram: np.ndarray, results: np.ndarray | None):
        self.dl_device = (KDL_CPU, 0)
        self._keep = (vram, results)
        self.vram_slots = vram.ctypes.data
        self.results = results.ctypes.data if results is not None else 0

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int = 0):
        if width and height:
            _host_array(dst, (height, width), (dst_pitch, 1))[...] = _host_array(src, (height, width), (src_pitch, 1))

    def wait(self, stream: int) -> None:
        pass

    def read(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        self.copy_2d(dst, dst_pitch, src, src_pitch, width, height)

    def sync_stream(self, stream: int) -> None:
        pass


DeviceMemory = CudaMemory | SimMemory
"""What a backend's ``dmem`` is (backend.Backend)."""


# -- the host's reads of a result ring in VRAM -------------------------------------------------------


class StagedBytes:
    """GpuQueue._res_data with ``result_memory="device"``: ``[off:off + n]`` copies those bytes of
    the VRAM result ring into the same place of the mapped ``res_data`` region (the staging buffer)
    and returns that memoryview slice, so ``try_dequeue_result`` runs unchanged.  Used under the
    consumer lock (the staging buffer is the consumer's)."""

    __slots__ = ("dmem", "host", "host_ptr")

    def __init__(self, dmem, host: memoryview):
        self.dmem, self.host, self.host_ptr = dmem, host, np.frombuffer(host, np.uint8).ctypes.data

    def __getitem__(self, key: slice) -> memoryview:
        start, stop = key.start, key.stop
        if stop > start:
            self.dmem.read(
                self.host_ptr + start, stop - start, self.dmem.results + start, stop - start, stop - start, 1
            )
        return self.host[key]

    def rows(self, capacity: int, slot_bytes: int) -> StagedRows:
        return StagedRows(self, np.frombuffer(self.host, np.uint8).reshape(capacity, slot_bytes), slot_bytes)


class StagedRows:
    """bulk._Rings.res_data with ``result_memory="device"``: ``[a:b]`` or ``[a:b, :width]`` copies those
    rows (that width) from VRAM into the staging buffer (one 2-D copy) and returns the staged rows."""

    __slots__ = ("b", "host", "sb")

    def __init__(self, staged: StagedBytes, host: np.ndarray, slot_bytes: int):
        self.b, self.host, self.sb = staged, host, slot_bytes

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        a, b = rows.start, rows.stop
        width = self.sb if cols.stop is None else min(cols.stop, self.sb)
        if b > a and width:
            off, d = a * self.sb, self.b.dmem
            d.read(self.b.host_ptr + off, self.sb, d.results + off, self.sb, width, b - a)
        return self.host[key]


# -- in: device arrays to enqueue --------------------------------------------------------------------


class _Source:
    """A checked 2-D uint8 array to enqueue: its address, rows, row size, row pitch and stream; and
    ``close()``, which hands a consumed DLPack tensor back to its producer (its deleter)."""

    __slots__ = ("ptr", "n", "size", "pitch", "stream", "_managed")

    def __init__(self, ptr, n, size, pitch, stream, managed=0):
        self.ptr, self.n, self.size, self.pitch, self.stream, self._managed = ptr, n, size, pitch, stream, managed

    def close(self) -> None:
        if self._managed:
            managed, self._managed = DLManagedTensor.from_address(self._managed), 0
            if managed.deleter:
                managed.deleter(ctypes.addressof(managed))


def _check_shape(where: str, shape, strides_bytes, typestr_ok: bool, dtype: str, sb: int, lengths) -> tuple:
    if len(shape) != 2:
        raise PayloadTypeError(
            f"array must be 2-D [n, size] (one message per row), not {len(shape)}-D of shape {tuple(shape)}"
        )
    if not typestr_ok:
        raise PayloadTypeError(f"array must have dtype uint8, not {dtype} (view it as uint8 first)")
    n, size = int(shape[0]), int(shape[1])
    row, col = (size, 1) if strides_bytes is None else (int(strides_bytes[0]), int(strides_bytes[1]))
    if size > 1 and n and col != 1:
        raise PayloadTypeError(f"array rows must be contiguous (strides[1] == 1 byte), not {col} ({where})")
    if n > 1 and row < size:
        raise PayloadTypeError(
            f"array's row stride (strides[0]) is {row} bytes; it must be >= the row size {size} (no reversed or "
            f"overlapping rows; {where})"
        )
    if lengths is None and size > sb:
        raise PayloadError(f"array rows are {size} bytes; slot_bytes is {sb} (the limit per message)")
    return n, size, max(row, size)


def import_array(array, dmem, sb: int, lengths, stream) -> _Source:
    """Check ``array`` (CUDA array interface, ``__array_interface__`` on the simulator, or DLPack) and
    return it as a _Source; nothing is copied.  Raises PayloadTypeError / PayloadError / ConfigError."""
    sim = dmem.dl_device[0] == KDL_CPU
    explicit = None if stream is None else stream_handle(stream)
    iface_name = "__array_interface__" if sim else "__cuda_array_interface__"
    try:  # torch raises RuntimeError for a tensor that requires grad
        iface = getattr(array, iface_name, None) if not isinstance(array, type) else None
    except Exception as exc:  # noqa: BLE001 - whatever the producer raises
        raise PayloadTypeError(f"array's {iface_name} cannot be read: {exc}") from None
    if iface is not None:
        try:  # a producer's dict: "shape", "typestr" and "data" (ptr, read_only) are required
            mask, typestr, shape = iface.get("mask"), str(iface["typestr"]), tuple(iface["shape"])
            strides, cai_stream, ptr = iface.get("strides"), iface.get("stream"), int(iface["data"][0])
        except Exception as exc:  # noqa: BLE001 - whatever a malformed dict makes fail
            raise PayloadTypeError(
                f"array's {iface_name} is malformed ({type(exc).__name__}: {exc}): it needs 'shape', 'typestr' "
                "and 'data' = (pointer, read_only)"
            ) from None
        if mask is not None:
            raise PayloadTypeError(f"array's {iface_name} has a mask; masked arrays are not supported")
        n, size, pitch = _check_shape(iface_name, shape, strides, typestr[1:] == "u1", typestr, sb, lengths)
        use = explicit if explicit is not None else cai_stream if cai_stream else dmem.in_stream
        return _Source(ptr, n, size, pitch, use)
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        dev_type, dev_id = _ask(array, "__dlpack_device__", lambda: tuple(int(x) for x in array.__dlpack_device__()))
        want = (KDL_CPU,) if sim else (KDL_CUDA, KDL_CUDA_MANAGED)
        if dev_type not in want:
            _refuse_memory(array, _DEVICE_NAMES.get(dev_type, f"device type {dev_type}"), sim)
        if not sim and dev_id != dmem.dl_device[1]:
            raise PayloadError(f"array is on CUDA device {dev_id}; the queue runs on device {dmem.dl_device[1]}")
        use = explicit if explicit is not None else dmem.in_stream
        capsule = _ask(array, "__dlpack__", lambda: array.__dlpack__() if sim else array.__dlpack__(stream=use or 1))
        if not _valid(capsule, _NAME):
            raise PayloadTypeError("array.__dlpack__() did not return an unused 'dltensor' capsule")
        address = _pointer(capsule, _NAME)
        _set_name(capsule, _USED)  # consumed: from now on the deleter is ours to call
        src = _Source(0, 0, 0, 0, use, address)
        try:
            t = DLManagedTensor.from_address(address).dl_tensor
            ndim = int(t.ndim)
            shape = tuple(t.shape[i] for i in range(ndim))
            strides = tuple(t.strides[i] for i in range(ndim)) if t.strides else None
            dt = t.dtype
            ok = (dt.code, dt.bits, dt.lanes) == (1, 8, 1)
            dtype = f"DLPack dtype (code {dt.code}, {dt.bits} bits, {dt.lanes} lanes)"
            src.n, src.size, src.pitch = _check_shape("__dlpack__", shape, strides, ok, dtype, sb, lengths)
            src.ptr = (t.data or 0) + int(t.byte_offset)
        except BaseException:
            src.close()
            raise
        return src
    _refuse_memory(array, None, sim)
    raise AssertionError  # not reached


def _ask(array, what: str, call):
    """``call()``, the producer's DLPack method ``what``; whatever it raises (numpy's BufferError for a
    read-only array, torch's RuntimeError for a tensor that requires grad) as a PayloadTypeError."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - whatever the producer raises
        raise PayloadTypeError(
            f"array's {what}() failed: {type(exc).__name__}: {exc} ({type(array).__name__})"
        ) from exc


def _refuse_memory(array, where: str | None, sim: bool) -> None:
    name = type(array).__name__
    if sim:
        raise PayloadTypeError(
            f"array must be a host array on backend='sim' (numpy: __array_interface__ or a kDLCPU __dlpack__), "
            f"not {name}" + (f" in {where} memory" if where else "")
        )
    if where is not None or hasattr(array, "__array_interface__"):
        raise PayloadTypeError(
            f"array is in host memory ({where or 'a host array'}, {name}): enqueue_device takes GPU arrays (a CuPy "
            "array, a torch CUDA tensor: __cuda_array_interface__ or a kDLCUDA __dlpack__); enqueue_many takes "
            "host arrays"
        )
    raise PayloadTypeError(
        f"array must expose __cuda_array_interface__ or __dlpack__ (a CuPy array, a torch CUDA tensor), not {name}"
    )


class DeviceCalls:
    """The device-array calls of GpuQueue (a base class of it, beside bulk.BulkCalls)."""

    def enqueue_device(self, array, lengths=None, stream=None, timeout: float | None = None) -> int:
        """Enqueue the rows of a device array, device to device, with no host copy and no CUDA call
        per message; return the first msg_id (the batch has ``first .. first + n - 1``).

        array:   a uint8 2-D ``[n, size]`` array in GPU memory, ``size <= slot_bytes``: a CuPy array,
                 a torch CUDA tensor, anything with ``__cuda_array_interface__`` or a kDLCUDA
                 ``__dlpack__`` on the queue's device (on the simulator: a numpy array).  Rows may be
                 strided (row pitch >= size, each row contiguous).
        lengths: None (every message is ``size`` bytes) or n ints, each 0 .. size (then rows wider
                 than slot_bytes are fine: only the first ``min(size, slot_bytes)`` bytes are copied).
        stream:  where the copies run, ordered after the work that produced the array: an int handle,
                 a cupy.cuda.Stream, a torch.cuda.Stream, or None = the stream the array's CUDA array
                 interface names (its producer's), else the queue's own non-blocking stream (for
                 DLPack the producer is asked to order its work before that stream).  The call waits
                 for the copies (one event on that stream, not the context), so the array may be
                 reused as soon as it returns.
        timeout: seconds to wait until n slots are free (None = ``config.enqueue_timeout_s``).
        All or nothing, as ``enqueue_many``: a bad array or a batch that does not fit enqueues
        nothing, and nothing already queued is touched.

        Raises PayloadTypeError (not 2-D, not uint8, rows not contiguous, a host array on the GPU,
        no array interface), PayloadError (rows > slot_bytes, n > capacity, bad lengths, another
        device), ConfigError (a bad stream or timeout), QueueFull, QueueClosed, KernelFault /
        PluginHung, KernelStopped, CudaError (the copy failed: nothing was published), GpuqError
        (this thread holds an open reservation).
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        dmem, sb = self._kernel.dmem, self._sb
        src = import_array(array, dmem, sb, lengths, stream)
        try:
            n, width = src.n, min(src.size, sb)
            lens = None
            if lengths is not None:
                lens = lengths_array(lengths, n, width, "slot_bytes" if src.size >= sb else "the row")
            if n > self._cap:
                raise PayloadError(
                    f"a batch of {n} messages exceeds capacity={self._cap} (the most one call can enqueue)"
                )
            with self._plock:
                seq = self._room_locked(n, timeout)
                if n == 0:
                    return seq
                self._producer_away = True  # the driver calls let go of the GIL: _give_way
                try:
                    if width:
                        pitch = HEADER_BYTES + sb
                        for s0, i0, k in _segments(seq, n, self._cap):  # one copy per run of slots ...
                            dst = dmem.vram_slots + s0 * pitch + HEADER_BYTES
                            dmem.copy_2d(dst, pitch, src.ptr + i0 * src.pitch, src.pitch, width, k, src.stream)
                        dmem.wait(src.stream)  # ... done before the headers say so
                    self._publish_locked(seq, n, lens, width, _VRAM_WORD)
                finally:
                    self._producer_away = False
        finally:
            src.close()
        self._after_batch()
        return seq

    def _device_view(self, first: int, slot: int, n: int, lengths, flags) -> DeviceResultView:
        """The view of held msg_ids ``first ..`` from slot ``slot`` (bulk._take_locked, "device" mode)."""
        dmem = self._kernel.dmem
        array = DeviceArray(dmem.results + slot * self._sb, n, self._sb, dmem.dl_device, self)
        return DeviceResultView(self, first, array, lengths, flags)

    def view_results_device(self, first: int, n: int, timeout: float | None = 1.0, *, errors="raise"):
        """``view_results`` in VRAM: wait for the results of msg_ids ``first ..`` and lend them in
        place as a DeviceResultView whose ``data`` is a :class:`DeviceArray` (``[len(v),
        slot_bytes]`` uint8) for CuPy / torch (CUDA array interface, DLPack), no copy.

        Needs ``QueueConfig(result_memory="device")``.  Covers ``min(n, capacity - first %
        capacity)`` results (never past the ring's end), from the oldest result not taken or held,
        as ``view_results``; timeout, errors: as ``take_results``.  Stream semantics and lifetime:
        module docstring (no synchronisation needed to read; the slots free once the view is
        released and every exported array is gone).

        Raises ConfigError (result_memory is "host", first not the oldest result not taken or held,
        bad arguments), UnknownMessage, ResultTimeout, KernelStopped, ProtocolError / MessageFailed,
        QueueClosed, TypeError.
        """
        if self.config.result_memory != "device":
            raise ConfigError(
                "view_results_device lends results in VRAM: it needs QueueConfig(result_memory='device'); this "
                "queue's result_memory is 'host' (view_results lends them in host memory)"
            )
        first, n, timeout = self._range_args(first, n, timeout, errors, lo=1)
        return self._take_range(first, n, timeout, "device", None, errors)
