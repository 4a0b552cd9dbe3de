"""Per-queue parameters: one array of bytes (model weights, a table, a key) that the plugin reads.

``QueueConfig(params=...)`` and ``BatchProcessor(params=...)`` take any C-contiguous bytes-like
object (bytes, bytearray, memoryview, a numpy array of plain numbers: its raw bytes, in its own
dtype and C order), up to :data:`MAX_PARAMS_BYTES`; None or 0 bytes means none.  It is copied
once into an immutable ``bytes`` when the config is built (so a QueueConfig stays hashable and
compares by content, and a later change to the caller's array changes nothing), then, on the GPU,
uploaded once into its own VRAM buffer *before* the kernel's first launch (a running persistent
kernel would block cuMemAlloc) and freed only after the kernel has exited.  The device code reads
it through ``gpuq_params()`` / ``gpuq_params_bytes()`` (device_src/gpuq_plugin_api.cuh), which
read the ``__device__`` variable ``gpuq_params_g`` that :func:`upload` sets; the twin gets it as a
read-only memoryview (plugins.py).
"""

from __future__ import annotations

import ctypes

import numpy as np

from .errors import ConfigError, GpuqError, PayloadTypeError
from .payload import byte_view

MAX_PARAMS_BYTES = 1 << 30
"""The largest params array: 1 GiB (on the GPU it must also fit in the free VRAM)."""

GLOBAL_NAME = "gpuq_params_g"
"""The ``__device__ GpuqParams`` variable each kernel defines and the host sets."""


class PluginParams(ctypes.Structure):
    """``GpuqParams`` of device_src/gpuq_plugin_api.cuh: the params array's device address and size."""

    _fields_ = [("ptr", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def check_params(value, name: str = "params") -> bytes:
    """``value`` as immutable bytes (b"" for None): a copy of any C-contiguous bytes-like object
    (a ``bytes`` is kept as it is), at most MAX_PARAMS_BYTES.  Raises ConfigError naming ``name``
    and the limit otherwise."""
    if value is None:
        return b""
    if type(value) is bytes:
        view = value
    else:
        try:
            view = byte_view(value, name)
        except PayloadTypeError as exc:
            raise ConfigError(f"{name}={type(value).__name__} object: {exc}") from None
    n = len(view) if type(view) is bytes else view.nbytes
    if n > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{name}={n:,} bytes exceeds the limit: {name} <= {MAX_PARAMS_BYTES:,} bytes (1 GiB; 0 = none)"
        )
    return view if type(view) is bytes else bytes(view)


def describe(params: bytes) -> str:
    """A short repr: ``b''`` when none, else ``<N bytes>`` (never the bytes themselves)."""
    return "b''" if not params else f"<{len(params):,} bytes>"


def upload(ctx, module, stream, data: bytes, device: int):
    """Copy ``data`` into a new VRAM buffer and point the module's ``gpuq_params_g`` at it
    ({nullptr, 0} when ``data`` is empty), waiting on ``stream`` until both copies are done.

    Call it before the module's first launch of a persistent kernel (it allocates).  Returns the
    DeviceBuffer (None when ``data`` is empty), which the caller frees after the kernel has exited.
    Raises ConfigError when ``data`` is larger than the device's free memory, CudaError, GpuqError
    (the module's ``gpuq_params_g`` is not a GpuqParams).
    """
    from . import driver

    buf = None
    if data:
        free, total = driver.mem_get_info(ctx)
        if len(data) > free:
            raise ConfigError(
                f"params={len(data):,} bytes do not fit in device {device}'s free memory: "
                f"{free:,} of {total:,} bytes are free"
            )
        buf = driver.DeviceBuffer(ctx, len(data))
    try:
        ptr, size = module.global_ptr(GLOBAL_NAME)
        if size != ctypes.sizeof(PluginParams):
            raise GpuqError(
                f"the kernel's {GLOBAL_NAME} is {size} bytes, not {ctypes.sizeof(PluginParams)}: "
                "device_src/gpuq_plugin_api.cuh and gpuq_driver/params.py disagree"
            )
        if buf is not None:
            src = np.frombuffer(data, np.uint8)  # no copy: the bytes' own buffer, alive until the sync
            driver.copy_htod_async(buf.ptr, src.ctypes.data, len(data), stream)
        value = PluginParams(buf.ptr if buf is not None else 0, len(data))
        driver.copy_htod_async(ptr, ctypes.addressof(value), ctypes.sizeof(value), stream)
        stream.synchronize()
    except BaseException:
        if buf is not None:
            buf.close()
        raise
    return buf
