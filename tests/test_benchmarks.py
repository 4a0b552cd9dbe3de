"""The benchmark scripts' dry runs on the CPU simulator: they run, check their results, and write
their JSON (the GPU runs are in benchmarks/gpu_session.sh; no test here measures a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_plugins_dry_run_on_the_simulator(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--backend", "sim", "--messages", "300", "--iters", "30", "--sizes", "16,48", "--scores", "8"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_plugins.py"), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_plugins.json").read_text())
    assert sorted(res["sizes"]) == ["16", "48"] and res["n"] == 8
    for k, row in res["sizes"].items():
        assert set(row) == {"gpuq", "gpuq_many", "batch"}, row.keys()  # no CuPy in a simulator run
        for way, m in row.items():
            assert m["err"] <= 1e-3 and m["msg_per_s"] > 0 and m["latency"]["n"] == 30, (k, way, m)
    assert "CuPy not run: the simulator dry run" in r.stdout


def test_stress_one_read_dry_run_on_the_simulator(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--backend", "sim", "--messages", "2000", "--producers", "3", "--max-bytes", "256"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress_one_read.py"), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "stress_one_read.json").read_text())
    assert res["messages"] == res["processed"] == 1998 and res["wrong"] == 0 and not res["errors"]
    assert res["spec_retries"] >= 0 and "torn or stale reads retried" in r.stdout
