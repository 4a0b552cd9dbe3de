"""Shared fixtures: the GPU probe (skips always give the reason), and the queue backends.

Every test that needs a GPU asks for the ``gpu`` fixture (or the ``backend`` fixture's "cuda"
value); where no CUDA driver or device exists it is skipped with the driver's own message.
Everything else runs everywhere: on the "sim" backend the real host code of GpuQueue runs
against the CPU simulator.
"""

from __future__ import annotations

import functools
import os

import pytest

import gpuq_driver
from gpuq_driver import CudaUnavailable


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason() -> str | None:
    """None where a CUDA device is usable, else why not (the driver's words)."""
    if os.environ.get("GPUQ_SKIP_GPU"):
        return "GPUQ_SKIP_GPU is set"
    try:
        gpuq_driver.device_count()
    except CudaUnavailable as exc:
        return f"no usable CUDA GPU: {exc}"
    return None


@pytest.fixture(scope="session")
def gpu():
    """The DeviceInfo of device 0; skips with the reason where there is none."""
    reason = gpu_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return gpuq_driver.device_info(0)


@pytest.fixture(params=["sim", "cuda"])
def backend(request):
    """Runs a test on the CPU simulator and, where a GPU exists, on the real persistent kernel."""
    if request.param == "cuda":
        reason = gpu_unavailable_reason()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def make_queue(backend):
    """make_queue(**config_fields) -> a started GpuQueue on the test's backend, closed afterwards."""
    queues = []

    def make(**fields):
        q = gpuq_driver.GpuQueue(gpuq_driver.QueueConfig(backend=backend, **fields))
        queues.append(q)
        return q

    yield make
    for q in queues:
        q.close()
