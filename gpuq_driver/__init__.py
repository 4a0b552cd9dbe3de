"""gpuq_driver: a message queue resident in GPU-visible memory, served by one persistent kernel.

Pure Python over NVIDIA's cuda-python driver API and NVRTC.  See README.md and docs/design.md.
"""

from .aio import AsyncQueue
from .batch import FAILED, BatchProcessor
from .compiler import CompileOptions, compile_cubin
from .device_arrays import DeviceArray, DeviceResultView
from .driver import DeviceInfo, device_count, device_info
from .errors import (
    CompileError,
    ConfigError,
    CudaError,
    CudaUnavailable,
    GpuqError,
    KernelFault,
    KernelStopped,
    MessageFailed,
    PayloadError,
    PayloadTypeError,
    PluginHung,
    ProtocolError,
    QueueClosed,
    QueueFull,
    ResultTimeout,
    UnknownMessage,
)
from .queue import GpuQueue, QueueConfig, QueueStats

__version__ = "0.1.0"

__all__ = [
    "AsyncQueue",
    "BatchProcessor",
    "CompileError",
    "CompileOptions",
    "ConfigError",
    "CudaError",
    "CudaUnavailable",
    "DeviceArray",
    "DeviceInfo",
    "DeviceResultView",
    "FAILED",
    "GpuQueue",
    "GpuqError",
    "KernelFault",
    "KernelStopped",
    "MessageFailed",
    "PayloadError",
    "PayloadTypeError",
    "PluginHung",
    "ProtocolError",
    "QueueClosed",
    "QueueConfig",
    "QueueFull",
    "QueueStats",
    "ResultTimeout",
    "UnknownMessage",
    "compile_cubin",
    "device_count",
    "device_info",
]
