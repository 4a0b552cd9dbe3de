"""The one status check, and the errors a machine without a GPU gives."""

import pytest
from cuda.bindings import driver, nvrtc

import gpuq_driver
from gpuq_driver import CudaError, CudaUnavailable, GpuqError
from gpuq_driver.errors import check

from .conftest import gpu_unavailable_reason


def test_success_unwraps_values():
    assert check((driver.CUresult.CUDA_SUCCESS,)) is None
    assert check((driver.CUresult.CUDA_SUCCESS, 7)) == 7
    assert check((nvrtc.nvrtcResult.NVRTC_SUCCESS, 1, 2)) == (1, 2)


def test_nvrtc_error_carries_name_and_text():
    with pytest.raises(CudaError) as info:
        check((nvrtc.nvrtcResult.NVRTC_ERROR_INVALID_INPUT, None), "nvrtcCompileProgram")
    e = info.value
    assert e.name == "NVRTC_ERROR_INVALID_INPUT" and e.code == 3 and e.call == "nvrtcCompileProgram"
    assert "INVALID_INPUT" in e.text.upper() and "nvrtcCompileProgram" in str(e)


@pytest.mark.parametrize(
    "code, cls",
    [
        (driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY, CudaError),
        (driver.CUresult.CUDA_ERROR_NO_DEVICE, CudaUnavailable),
        (driver.CUresult.CUDA_ERROR_STUB_LIBRARY, CudaUnavailable),
        (driver.CUresult.CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, CudaUnavailable),
    ],
)
def test_driver_error_maps_to_its_class(code, cls):
    with pytest.raises(cls) as info:
        try:
            check((code,), "cuMemAlloc")
        except CudaError as e:  # without a driver cuGetErrorString cannot run: the name is still there
            assert e.name == code.name and e.code == int(code)
            raise
    assert isinstance(info.value, GpuqError)


def test_error_tree():
    assert issubclass(gpuq_driver.QueueFull, GpuqError) and issubclass(gpuq_driver.QueueClosed, GpuqError)
    assert issubclass(gpuq_driver.PayloadTypeError, TypeError) and issubclass(gpuq_driver.PayloadError, ValueError)
    assert issubclass(gpuq_driver.CompileError, GpuqError) and issubclass(CudaUnavailable, CudaError)


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="this machine has a GPU: the no-GPU error cannot be seen")
def test_no_gpu_gives_a_clear_error():
    with pytest.raises(CudaUnavailable) as info:
        gpuq_driver.GpuQueue(gpuq_driver.QueueConfig())
    assert info.value.call == "cuInit" or "device" in str(info.value).lower()
    with pytest.raises(CudaUnavailable):
        gpuq_driver.device_count()


def test_cuda_unavailable_points_to_the_simulator():
    """Issue 10 item 12: where no GPU exists, the error says how to run without one."""
    exc = CudaUnavailable(100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected", "cuInit")
    assert 'QueueConfig(backend="sim")' in str(exc) and "CUDA_ERROR_NO_DEVICE" in str(exc)
