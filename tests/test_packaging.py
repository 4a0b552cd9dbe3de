"""The wheel carries device_src/, the examples, py.typed and the ``gpuq`` command, and an installed
package finds its kernels and examples there."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None,
    reason="hatchling (the build backend, in the [test] extra) is not installed",
)
def test_wheel_ships_device_src(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("gpuq_driver-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "device_src").rglob("*")):
        if src.is_file():
            assert f"gpuq_driver/device_src/{src.relative_to(ROOT / 'device_src')}" in names
    assert {
        "gpuq_driver/queue.py",
        "gpuq_driver/py.typed",
        "gpuq_driver/cli.py",
        "gpuq_driver/hostpath.c",  # the compiled host path is built from it at first use
        "gpuq_driver/examples/producer_consumer.py",
        "gpuq_driver/streams/complete.lua",
    } <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gpuq = gpuq_driver.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # unpacked, the package uses its own copy of the kernels
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gpuq_driver import cli, compiler; print(compiler.DEVICE_SRC); print(cli.EXAMPLES)",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [str(site / "gpuq_driver" / "device_src"), str(site / "gpuq_driver" / "examples")]


def test_markers_select_gpu_redis_and_slow_tests():
    """-m gpu / redis / slow pick the tests that need a GPU, a redis-server, or a long run."""

    def ids(expr):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                expr,
                "tests",
                "properties",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return {line for line in out.stdout.splitlines() if "::" in line}

    gpu, redis, slow = ids("gpu"), ids("redis"), ids("slow")
    assert "tests/test_gpu.py::test_cubin_for_the_device_arch_loads" in gpu
    assert any(i.startswith("tests/test_lifecycle.py::") and "[cuda]" in i for i in gpu)
    assert not any("[sim]" in i or i.startswith("tests/test_config.py") for i in gpu)
    assert any(i.startswith("tests/test_redis_clients.py::") for i in redis)
    assert not any(i.startswith("tests/test_queue.py::") for i in redis)
    assert any(i.startswith("tests/test_exit.py::") for i in slow)
