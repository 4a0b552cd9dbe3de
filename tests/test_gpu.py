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


def _empty_kernel(gpu):
    ctx = driver.primary_context(0)
    module = driver.Module(ctx, compile_cubin("gpuq_bench.cu", CompileOptions(arch=gpu.arch)))
    return ctx, module, module.function("gpuq_empty")


def test_the_cooperative_graph_keeps_the_cooperative_limit(gpu):
    """driver.CooperativeGraph, which launches every lease, is a cooperative launch: a grid of more
    blocks than fit the device at once is refused, as cuLaunchCooperativeKernel refuses it (a
    graph whose node had lost the attribute would run it)."""
    ctx, module, fn = _empty_kernel(gpu)
    stream = driver.Stream(ctx)
    too_many = driver.max_active_blocks(fn, 1024) * gpu.sm_count + 1
    args = driver.LaunchArgs([])
    try:
        with pytest.raises(driver.CudaError, match="COOPERATIVE_LAUNCH_TOO_LARGE"):
            driver.launch(fn, too_many, 1024, args, stream, cooperative=True)
        with pytest.raises(driver.CudaError, match="COOPERATIVE_LAUNCH_TOO_LARGE"):
            driver.CooperativeGraph(ctx, fn, too_many, 1024, args).launch(stream)
        fits = driver.CooperativeGraph(ctx, fn, gpu.sm_count, 1024, args)
        for _ in range(3):
            fits.launch(stream)
        stream.synchronize()
        fits.close()
        assert fits.closed
    finally:
        stream.close()
        module.close()


def test_leases_launch_from_threads_with_no_context_or_another_one_current(gpu):
    """The graph launch and the stream query make the queue's context current only when the call
    fails without it: a fresh thread has none current, and a thread where another context is
    current (one the user created) launches and asks the stream too; every message comes back."""
    import threading
    import time

    from cuda.bindings import driver as cu

    with GpuQueue(QueueConfig(capacity=64, slot_bytes=16, lease_ms=0.2)) as q:
        assert q._kernel.graph is not None  # the driver built it: leases are graph launches
        (_, dev) = cu.cuDeviceGet(0)
        err, other = cu.cuCtxCreate(None, 0, dev)
        assert err == cu.CUresult.CUDA_SUCCESS, err
        out, errors, kicked, idle = {}, [], {}, {}

        def producer(name, current):
            try:
                if current is not None:
                    assert cu.cuCtxSetCurrent(current)[0] == cu.CUresult.CUDA_SUCCESS
                kicked[name] = 0
                for i in range(40):
                    kicked[name] += q._leases.kick(ahead=True)  # a lease launched from this thread, if due
                    m = q.enqueue(f"{name}{i}".encode())
                    out[m] = q.wait_result(m, timeout=10)
                    time.sleep(5e-4)  # past the 0.2 ms lease: the next kick is due
                q.pause()  # waits for the stream to be idle: cuStreamQuery from this thread
                idle[name] = q._kernel.idle()
                q.resume()
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        try:
            for name, current in (("fresh", None), ("other", other)):
                t = threading.Thread(target=producer, args=(name, current))
                t.start()
                t.join(60)
                assert not t.is_alive() and not errors, errors
                assert kicked[name] > 0  # this thread launched leases
                assert idle[name] is True  # and asked the stream (no lease runs while paused)
            assert sorted(out.values()) == sorted(
                [f"fresh{i}".encode() for i in range(40)] + [f"other{i}".encode() for i in range(40)]
            )
        finally:
            cu.cuCtxDestroy(other)
