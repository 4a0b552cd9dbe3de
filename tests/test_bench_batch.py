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
    paths = ("copy", "inplace", "inplace2t")  # inplace2t: on by default
    assert {(x["path"], x["size"]) for x in r["sweep"]} >= {(p, s) for p in paths for s in (64, 256)}
    assert all(x["consumer_thread"] for x in r["sweep"] if x["path"] == "inplace2t")
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


def test_bench_batch_sweep_options_on_the_simulator(tmp_path):
    """--no-inplace2t leaves the path out; --sweep-tpb with two values on the simulator (one warp
    whatever it is told) runs one pass, records the geometry it ran and says so."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), "--backend", "sim", "--out", str(tmp_path)]
    cmd += ["--parts", "sweep", "--seconds", "0.02", "--sizes", "64", "--batches", "16", "--no-inplace2t"]
    cmd += ["--sweep-tpb", "64,128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench_batch.json").read_text())
    assert sorted(x["path"] for x in r["sweep"]) == ["copy", "inplace", "inplace_full"]
    assert {x["threads_per_block"] for x in r["sweep"]} == {32}
    assert any("one pass" in n for n in r["notes"])


def _bench_batch():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_batch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_batch


@pytest.mark.parametrize("side", ["consumer", "producer"])
def test_inplace2t_reports_an_error_of_either_thread(side, monkeypatch):
    """inplace2t: an error in the consumer thread, or in the producer, is raised by run_inplace
    (not swallowed, not a hang), and the consumer thread has ended."""
    import threading

    from gpuq_driver import GpuQueue

    bb = _bench_batch()
    name = "view_results" if side == "consumer" else "reserve"
    real, calls = getattr(GpuQueue, name), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # after the warm-up lap of the ring: inside the threaded loop
            raise RuntimeError(f"injected {side} failure")
        return real(self, *args, **kwargs)

    with bb.open_queue("sim", 64, 1024) as q:
        monkeypatch.setattr(GpuQueue, name, failing)
        with pytest.raises(RuntimeError, match=f"injected {side} failure"):
            bb.run_inplace(q, 64, 64, 5.0, full=False, consumer_thread=True)
        monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name == "bench-consumer"]
