"""examples/custom_plugin.py (a user plugin from a source string, checked against its twin) as a user runs it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gpuq_driver import CompileOptions, compiler

from .conftest import gpu_unavailable_reason

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_plugin.py"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_plugin", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_on_the_simulator_every_result_matches_the_twin():
    r = run("--backend", "sim", "--messages", "2000", "--slot-bytes", "64")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plugin 'reverse' on the CPU simulator: 2,000 messages, 0 differ from the twin" in r.stdout
    assert r.stdout.rstrip().endswith("OK")


def test_a_result_that_differs_from_the_twin_exits_1(example, monkeypatch, capsys):
    monkeypatch.setattr(example, "reverse_twin", lambda payload, msg_id: bytes(payload))  # not what ran
    assert example.main(["--backend", "sim", "--messages", "50", "--slot-bytes", "64"]) == 1
    out = capsys.readouterr().out
    assert "differs from the twin's" in out and out.rstrip().endswith("FAILED")


def test_the_twin_reverses(example):
    assert example.reverse_twin(memoryview(b"abc"), 0) == b"cba"


def test_the_plugin_compiles_for_the_queue(example, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUQ_CACHE_DIR", str(tmp_path))
    assert compiler.compile_cubin("gpuq_queue.cu", CompileOptions(arch="sm_90", plugin=example.REVERSE))


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="this machine has a GPU: the no-GPU path cannot be seen")
def test_without_gpu_says_so_in_one_line_and_exits_2():
    r = run("--messages", "10")
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "needs an NVIDIA GPU" in r.stderr and "--backend sim" in r.stderr


def test_on_the_gpu(gpu):
    r = run("--messages", "20000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plugin 'reverse' on the GPU: 20,000 messages, 0 differ from the twin" in r.stdout


@pytest.mark.parametrize("args", [("--messages", "0"), ("--slot-bytes", "17"), ("--backend", "opencl")])
def test_bad_arguments_exit_2(args):
    r = run("--backend", "sim", *args) if args[0] != "--backend" else run(*args)
    assert r.returncode == 2 and "usage:" in r.stderr
