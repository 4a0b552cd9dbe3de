"""Interpreter exit with daemon threads still inside an open queue: 20 runs of each pattern exit 0,
and after the exit cleanup every call raises QueueClosed (tests/exit_child.py).  Each run is a child
process with a time bound, so a hang fails instead of stalling the suite."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("exit_child.py")
RUNS = 20


def run_child(backend: str, pattern: str) -> tuple[int | str, str]:
    try:
        r = subprocess.run([sys.executable, str(CHILD), backend, pattern], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        return "hang (> 60 s)", str(exc.stdout)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("pattern", ["poller", "blocked", "pipeline"])
def test_exit_with_daemon_threads_in_the_queue(backend, pattern):
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda _: run_child(backend, pattern), range(RUNS)))
    bad = [(code, out[-800:]) for code, out in outcomes if code != 0 or "CLOSED-OK" not in out]
    assert not bad, f"{len(bad)} of {RUNS} runs went wrong; first: {bad[0]}"
    assert all("EXITING" in out for _, out in outcomes)
