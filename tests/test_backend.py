"""The backend contract (gpuq_driver/backend.py): both kernels have every member of the Protocol,
with the same annotations, so GpuQueue runs unchanged on either.  No GPU needed: the classes are
inspected; the simulator is built too and checked with isinstance."""

from __future__ import annotations

import inspect

import pytest

from gpuq_driver import QueueConfig, queue
from gpuq_driver.backend import Backend
from gpuq_driver.kernel import PersistentKernel
from gpuq_driver.sim import SimulatedKernel

DATA = ["layout", "mem", "doorbell", "ctrl", "blocks", "threads", "warps", "backend", "plugin", "dmem"]
METHODS = ["start", "launch", "idle", "exited", "close", "abandon"]


def test_the_protocol_is_what_gpuqueue_uses():
    members = {name for name in vars(Backend) if not name.startswith("_")} | set(Backend.__annotations__)
    assert members == set(DATA) | set(METHODS) | {"error"}
    assert inspect.get_annotations(queue._close_kernel)["kernel"] == "Backend"
    assert "self._kernel: Backend = " in inspect.getsource(queue.GpuQueue.__init__)


@pytest.mark.parametrize("cls", [PersistentKernel, SimulatedKernel])
def test_both_kernels_have_every_member(cls):
    hints = {}
    for klass in reversed(cls.__mro__):
        hints.update(inspect.get_annotations(klass))
    for name in DATA:
        if name in hints:
            assert hints[name] == Backend.__annotations__[name], f"{cls.__name__}.{name}"
        else:
            assert isinstance(getattr(cls, name, None), str), f"{cls.__name__} lacks {name}"
    for name in METHODS:
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} lacks {name}()"
        inspect.signature(method).bind(None)  # callable as GpuQueue calls it: no arguments
    assert isinstance(inspect.getattr_static(cls, "error"), property)


def test_the_simulator_is_a_backend_at_run_time():
    kernel = SimulatedKernel(QueueConfig(backend="sim"))
    try:
        assert isinstance(kernel, Backend) and kernel.backend == "sim"
    finally:
        kernel.close()
