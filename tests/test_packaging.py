"""The wheel carries device_src/, and an installed package finds its kernels there."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                    reason="hatchling (the build backend, in the [test] extra) is not installed")
def test_wheel_ships_device_src(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("gpuq_driver-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "device_src").rglob("*")):
        if src.is_file():
            assert f"gpuq_driver/device_src/{src.relative_to(ROOT / 'device_src')}" in names
    assert "gpuq_driver/queue.py" in names
    # unpacked, the package uses its own copy of the kernels
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run([sys.executable, "-c", "from gpuq_driver import compiler; print(compiler.DEVICE_SRC)"],
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""}, capture_output=True, text=True,
                         check=True)
    assert Path(out.stdout.strip()) == site / "gpuq_driver" / "device_src"
