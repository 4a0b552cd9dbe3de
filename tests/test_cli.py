"""The ``gpuq`` command (gpuq_driver/cli.py) as a user runs it: exit codes, what it prints."""

import json
import re
import subprocess
import sys

import pytest

from .conftest import gpu_unavailable_reason

NO_GPU = gpu_unavailable_reason()


def gpuq(*args, env=None, timeout=300):
    import os

    return subprocess.run(
        [sys.executable, "-m", "gpuq_driver.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_info_lists_versions_nvrtc_and_the_cache():
    r = gpuq("info")
    for row in (
        "gpuq_driver",
        "cuda-bindings",
        "NVRTC",
        "CCCL headers",
        "nvJitLink",
        "host path",
        "plugins",
        "CUBIN cache",
    ):
        assert row in r.stdout, r.stdout
    assert "crc32c, echo, score" in r.stdout  # the built-ins, by name
    if NO_GPU:
        assert r.returncode == 2 and "no usable CUDA GPU" in r.stdout and "backend='sim'" in r.stdout
    else:
        assert r.returncode == 0 and "device 0" in r.stdout and "sm_" in r.stdout and "ready" in r.stdout


def test_info_prints_every_value_whole_on_a_narrow_terminal():
    """rich read "[link]" in the nvJitLink hint as markup and dropped it, so the hint said to
    install plain gpuq-driver; and at 80 columns, or piped, long paths ended in "…" (a new user's
    trial, eleventh session).  Each value must come out whole, wherever the table folds it."""
    from gpuq_driver.cli import gpu_report

    r = gpuq("info", env={"COLUMNS": "60"})
    squeezed = re.sub(r"[\s\u2500-\u257f]", "", r.stdout)  # whitespace and box drawing
    rows, _ = gpu_report()
    for what, value in rows:
        if what != "CUBIN cache":  # its entries may change between the two calls
            assert re.sub(r"\s", "", value) in squeezed, (what, value, r.stdout)
    assert "…" not in r.stdout, r.stdout


def test_info_keeps_the_extra_in_the_nvjitlink_hint(monkeypatch, capsys):
    """Where nvJitLink is missing, the hint names the extra that brings it: gpuq-driver[link]."""
    from gpuq_driver import cli, compiler
    from gpuq_driver.errors import GpuqError

    def missing():
        raise GpuqError("nvJitLink not found")

    monkeypatch.setattr(compiler, "nvjitlink_info", missing)
    monkeypatch.setenv("COLUMNS", "200")
    cli.cmd_info(None)
    assert "pip install 'gpuq-driver[link]'" in capsys.readouterr().out


def test_demo_on_the_simulator_checks_every_message():
    r = gpuq("demo", "--backend", "sim", "--messages", "3000", "--capacity", "64", "--slot-bytes", "64")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3,000 sent, 3,000 received, 0 mismatched, 0 lost" in r.stdout and "OK" in r.stdout


def test_demo_usage_errors_are_the_examples_own_under_its_name():
    r = gpuq("demo", "--messages", "nan")
    assert r.returncode == 2 and "--messages" in r.stderr and "Traceback" not in r.stderr
    assert "usage: gpuq demo" in r.stderr
    assert gpuq("demo", "--help").stdout.startswith("usage: gpuq demo")


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU: the no-GPU path cannot be seen")
def test_demo_and_bench_without_gpu_say_so_and_exit_2():
    for args in (("demo", "--messages", "10"), ("bench",)):
        r = gpuq(*args)
        assert r.returncode == 2 and "needs an NVIDIA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(NO_GPU is not None, reason=f"needs a GPU: {NO_GPU}")
def test_bench_measures_both_paths_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    r = gpuq("bench", "--messages", "500", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(out.read_text())["round_trip_64B"]
    assert len(figures) == 2 and all(0 < f["p50_us"] <= f["p99_us"] and f["n"] == 500 for f in figures.values())


@pytest.mark.parametrize("n", ["5", "0", "-1"])
def test_bench_refuses_a_message_count_out_of_range(n):
    r = gpuq("bench", "--messages", n)
    assert r.returncode == 2 and "100 .. 10,000,000" in r.stderr and "usage: gpuq bench" in r.stderr


def test_cache_lists_and_clears_entries(tmp_path):
    env = {"GPUQ_CACHE_DIR": str(tmp_path)}
    from gpuq_driver.compiler import CACHE_FORMAT

    folder = tmp_path / CACHE_FORMAT
    folder.mkdir()
    (folder / "a.cubin").write_bytes(b"x" * 1000)
    (folder / "b.cubin").write_bytes(b"y" * 500)
    (folder / "c.ltoir").write_bytes(b"z" * 500)  # a kernel's LTO-IR, for precompiled plugins
    (folder / "notes.txt").write_text("not an entry")
    r = gpuq("cache", env=env)
    assert r.returncode == 0 and "3 entries, 0.0 MB" in r.stdout
    r = gpuq("cache", "--clear", env=env)
    assert r.returncode == 0 and "removed 3 entries" in r.stdout
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert "off" in gpuq("cache", env={"GPUQ_CACHE_DIR": "off"}).stdout
    # a file where the folder should be: said, not "0 entries"
    (tmp_path / "file").write_text("x")
    r = gpuq("cache", env={"GPUQ_CACHE_DIR": str(tmp_path / "file")})
    assert r.returncode == 2 and "is not a folder" in r.stderr


def test_no_command_is_a_usage_error():
    r = gpuq()
    assert r.returncode == 2 and "usage: gpuq" in r.stderr
