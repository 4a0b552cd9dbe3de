"""benchmarks/bench_batch.py runs on the CPU simulator (briefly): every part, its JSON and its plot,
every result checked by the script itself (it exits 1 on a mismatch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_batch_on_the_simulator(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), "--backend", "sim", "--out", str(tmp_path)]
    cmd += ["--seconds", "0.05", "--sizes", "64,256", "--batches", "16,32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench_batch.json").read_text())
    assert r["env"]["backend"] == "sim"
    assert {x["path"] for x in r["e2e64"]} == {"copy", "view", "inplace_full"}
    assert {(x["path"], x["size"]) for x in r["sweep"]} >= {(p, s) for p in ("copy", "inplace") for s in (64, 256)}
    rows = r["e2e64"] + r["sweep"]
    assert all(x["mismatches"] == 0 and x["msg_per_s"] > 0 for x in rows)
    assert r["aio"]["concurrent"]["wrong"] == 0 and r["aio"]["rtt_asyncio"]["p50_us"] > 0
    assert r["aio"]["idle_cpu"]["loop_thread"] < 0.05
    assert r["single"]["mismatches"] == 0
    assert "best 64 B end to end" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_batch.png").stat().st_size > 10_000
