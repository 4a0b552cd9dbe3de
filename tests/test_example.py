"""examples/producer_consumer.py as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import gpu_unavailable_reason

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "producer_consumer.py"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout)


def test_example_on_the_simulator_checks_every_message():
    r = run("--backend", "sim", "--messages", "3000", "--capacity", "64", "--slot-bytes", "64")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3,000 sent, 3,000 received, 0 mismatched, 0 lost" in r.stdout and r.stdout.rstrip().endswith("OK")


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="this machine has a GPU: the no-GPU path cannot be seen")
def test_example_without_gpu_says_so_in_one_line_and_exits_2():
    r = run("--messages", "10")
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "needs an NVIDIA GPU" in r.stderr


def test_example_on_the_gpu(gpu):
    r = run("--messages", "50000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "50,000 sent, 50,000 received, 0 mismatched, 0 lost" in r.stdout


@pytest.mark.parametrize(
    "args",
    [("--messages", "nan"), ("--messages", "inf"), ("--messages", "1e12"), ("--messages", "0"), ("--messages", "1.5")],
)
def test_bad_message_counts_are_one_usage_line(args):
    """Issue 10 item 10: no traceback, argparse's exit 2 with the reason."""
    r = run("--backend", "sim", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--messages" in r.stderr.strip().splitlines()[-1]


def test_message_counts_in_1e6_style_are_accepted():
    r = run("--backend", "sim", "--messages", "2e3", "--capacity", "64", "--slot-bytes", "64")
    assert r.returncode == 0 and "2,000 sent, 2,000 received" in r.stdout, r.stdout + r.stderr


def test_help_shows_the_defaults_and_the_exit_codes():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    assert "(default: 1000000)" in r.stdout and "(default: 4096)" in r.stdout and "130 interrupted" in r.stdout


def test_the_largest_slot_runs():
    r = run("--backend", "sim", "--capacity", "4", "--slot-bytes", "1048576", "--messages", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "20 sent, 20 received, 0 mismatched, 0 lost" in r.stdout
