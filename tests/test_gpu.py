"""What only the real device can show: the grid, the layout probe, and the one-kernel-per-device rule."""

import pytest

from gpuq_driver import CompileOptions, ConfigError, GpuqError, GpuQueue, QueueConfig, compile_cubin, driver


def test_cubin_for_the_device_arch_loads(gpu):
    ctx = driver.primary_context(0)
    module = driver.Module(ctx, compile_cubin("gpuq_queue.cu", CompileOptions(arch=gpu.arch)))
    assert module.function("gpuq_persistent") is not None and module.function("gpuq_layout_probe") is not None
    module.close()
    module.close()  # idempotent
    assert module.closed


def test_default_grid_is_one_block_per_sm(gpu):
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=16)) as q:
        s = q.stats()
        assert s.blocks == gpu.sm_count and s.warps == gpu.sm_count * s.threads_per_block // 32
        assert q._kernel.ctrl.warps == s.warps  # what the kernel itself counted


def test_grid_beyond_cooperative_limit_is_refused(gpu):
    with pytest.raises(ConfigError, match=r"blocks=65535: a cooperative launch .* fits at most"):
        GpuQueue(QueueConfig(capacity=16, slot_bytes=16, blocks=65535, threads_per_block=256))


def test_a_block_too_large_for_the_kernel_is_refused_by_name(gpu):
    """Since layout 5 the kernel needs more than 64 registers a thread: 1,024-thread blocks no
    longer fit an SM, and the error says so rather than failing the launch."""
    with pytest.raises(ConfigError, match=r"threads_per_block=1024: not even one block of the queue kernel fits"):
        GpuQueue(QueueConfig(capacity=16, slot_bytes=16, threads_per_block=1024))


def test_second_queue_on_the_same_device_is_refused(gpu):
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=16)) as q:
        with pytest.raises(GpuqError, match="already running on device 0"):
            GpuQueue(QueueConfig(capacity=16, slot_bytes=16))
        assert q.wait_result(q.enqueue(b"still fine")) == b"still fine"
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=16)) as q2:  # after close, a new one starts
        assert q2.wait_result(q2.enqueue(b"again")) == b"again"


def test_unknown_device_is_refused(gpu):
    with pytest.raises(ConfigError, match="device=1023"):
        GpuQueue(QueueConfig(device=1023))
