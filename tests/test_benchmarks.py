"""The benchmark scripts' dry runs on the CPU simulator: they run, check their results, and write
their JSON (the GPU runs are in benchmarks/gpu_session.sh; no test here measures a time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float = 240, **env_extra: str) -> subprocess.CompletedProcess:
    """benchmarks/<name> with ``args`` in a child Python (the project on its PYTHONPATH); its output
    captured as text."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra}
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_plugins_dry_run_on_the_simulator(tmp_path):
    args = ["--backend", "sim", "--messages", "300", "--iters", "30", "--sizes", "16,48", "--scores", "8"]
    r = run_script("bench_plugins.py", "--out", str(tmp_path), *args)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_plugins.json").read_text())
    assert sorted(res["sizes"]) == ["16", "48"] and res["n"] == 8
    for k, row in res["sizes"].items():
        assert set(row) == {"gpuq", "gpuq_many", "batch"}, row.keys()  # no CuPy in a simulator run
        for way, m in row.items():
            assert m["err"] <= 1e-3 and m["msg_per_s"] > 0 and m["latency"]["n"] == 30, (k, way, m)
    assert "CuPy not run: the simulator dry run" in r.stdout


def test_stress_one_read_dry_run_on_the_simulator(tmp_path):
    args = ["--backend", "sim", "--messages", "2000", "--producers", "3", "--max-bytes", "256"]
    r = run_script("stress_one_read.py", "--out", str(tmp_path), *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "stress_one_read.json").read_text())
    assert res["messages"] == res["processed"] == 1998 and res["wrong"] == 0 and not res["errors"]
    assert res["spec_retries"] >= 0 and "torn or stale reads retried" in r.stdout


def test_bench_redis_dry_run_puts_the_bridge_beside_track_a(tmp_path, redis_client):
    """bench_redis.py --backend sim at 64 B framed: Track A and the bridge in one run, every message
    back, the frame and batch used printed and recorded."""
    from gpuq_driver.streams.server import client_url

    args = ["--backend", "sim", "--sizes", "64", "--frame", "32", "--batch", "256", "--messages", "3000"]
    args += ["--modes", "track_a_framed,bridge_framed", "--pings", "5", "--producers", "1"]
    r = run_script("bench_redis.py", "--out", str(tmp_path), *args, REDIS_URL=client_url(redis_client))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_redis.json").read_text())
    assert [run["label"] for run in res["runs"]] == ["track_a_framed", "bridge_framed"]
    for run in res["runs"]:
        assert run["received"] == run["messages"] == 3000 and run["msg_per_s"] > 0, run
        assert (run["frame"], run["entries_per_read"], run["messages_per_read"]) == (32, 8, 256), run
        assert run["worker"]["failed"] == 0 and run["host_us_per_msg"] > 0
    assert res["runs"][1]["queue_capacity"] == 512
    assert "frame 32 messages/entry, 8 entries (256 messages) per XREADGROUP, queue capacity 512" in r.stdout


def test_bench_latency_dry_run_on_the_simulator(tmp_path):
    """bench_latency.py --sim runs the queue parts, the interleaved configurations (one_read among
    them) included, checks every result and writes its JSON to --out."""
    r = run_script("bench_latency.py", "--sim", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_latency.json").read_text())
    lat = res["latency"]
    for name in ("", "_one_read", "_one_read_never_leaves"):
        row = lat[f"gpuq_round_trip_64B{name}"]
        assert row["n"] == 40 and row["blocks_of_runs"] == 4 and row["mismatches"] == 0, (name, row)
    assert lat["gpuq_round_trip_64B_one_read"]["one_read"] is True
    assert res["enqueue_throughput"]["mismatches"] == 0 and res["sustained_one_thread"]["mismatches"] == 0
    assert "mismatches 0" in r.stdout


def test_probe_tail_on_the_simulator(tmp_path):
    """probe_tail.py --sim: every lease_ms x one_read case prints its line, even with few round trips;
    --iters below 2 is refused with a usage error, not a traceback."""
    r = run_script("probe_tail.py", "--sim", "--iters", "3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if "keeper look " in ln]
    assert len(lines) == 1 + 3 * 2 and all(ln.endswith("bad 0") for ln in lines), r.stdout
    # and under each, where its round trips fell in the lease (the hand-over rule on: second=True)
    assert sum("second=True: keeper looked in" in ln for ln in r.stdout.splitlines()) == 1 + 3 * 2, r.stdout
    r = run_script("probe_tail.py", "--sim", "--iters", "1", timeout=60)
    assert r.returncode == 2 and "--iters must be at least 2" in r.stderr, r.stderr[-2000:]


def test_host_steps_dry_run_on_the_simulator(tmp_path):
    """host_steps.py --sim: every step of enqueue and try_dequeue_result timed, the whole calls
    timed on a ring, every result taken back right."""
    args = ["--sim", "--number", "2000", "--repeat", "2", "--messages", "3000", "--capacity", "4096"]
    r = run_script("host_steps.py", "--out", str(tmp_path), *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "host_steps.json").read_text())
    assert res["wrong"] == 0 and res["env"]["device"] == "CPU simulator"
    assert {"producer lock", "payload copy (64 B)", "slot check (one_read)", "doorbell store (mapped)"} <= set(
        res["enqueue_steps_ns"]
    )
    assert {"consumer lock", "result copy out (64 B)"} <= set(res["take_steps_ns"])
    assert all(v >= 0 for v in [*res["enqueue_steps_ns"].values(), *res["take_steps_ns"].values()])
    assert res["calls_ns"]["enqueue call"] > 0 and res["calls_ns"]["try_dequeue_result call"] > 0
    assert "wrong results: 0" in r.stdout


def _benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (its folder on sys.path only while it loads)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_bench_latency_dry_run_counts_the_one_read_enqueue_mismatches(tmp_path, monkeypatch):
    """sim_dry_run exits 1 when the one_read enqueue throughput run took a wrong result (the parts
    stubbed: only the verdict is under test)."""
    bl = _benchmark_module("bench_latency")
    row = {"mismatches": 0, "n": 1}
    monkeypatch.setattr(bl, "GpuQueue", bl.GpuQueue)  # sim_dry_run swaps it for the simulator's
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)
    monkeypatch.setattr(bl, "queue_round_trip", lambda *a, **k: dict(row))
    monkeypatch.setattr(bl, "round_trips_interleaved", lambda size, iters, cfgs, **k: {c: dict(row) for c in cfgs})
    monkeypatch.setattr(bl, "after_idle", lambda *a, **k: dict(row))
    monkeypatch.setattr(bl, "pause_resume", lambda *a, **k: {})
    monkeypatch.setattr(bl, "sustained_one_thread", lambda *a, **k: dict(row))
    monkeypatch.setattr(bl, "plot", lambda *a, **k: None)
    monkeypatch.setattr(
        bl,
        "enqueue_throughput_interleaved",
        lambda n, cfgs, rounds=4: {c: {"mismatches": int(c == "_one_read")} for c in cfgs},
    )
    assert bl.sim_dry_run(tmp_path) == 1


def test_host_steps_plot_sums_the_steps_as_the_table_does(monkeypatch, tmp_path):
    """host_steps.py's plot: the "sum of the steps" bar leaves out the "(mapped)" re-measurements of
    steps already counted, as the printed table does."""
    hs = _benchmark_module("host_steps")
    bars = []

    class Ax:
        def barh(self, names, vals, color=None):
            bars.append(dict(zip(names, vals)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    class Fig:
        def __getattr__(self, name):
            return lambda *a, **k: None

    class Plt:
        def subplots(self, *a, **k):
            return Fig(), [Ax(), Ax()]

    monkeypatch.setattr(hs, "pyplot", lambda *a: Plt())
    enq = {"producer lock": 100.0, "header: 2 stores": 50.0, "header: 2 stores (mapped)": 60.0}
    res = {
        "env": {"device": "test", "python": "3"},
        "enqueue_steps_ns": enq,
        "take_steps_ns": {"consumer lock": 10.0},
        "calls_ns": {"enqueue call": 500.0, "try_dequeue_result call": 100.0},
    }
    hs.plot(res, tmp_path / "host_steps.png")
    assert [b["sum of the steps"] for b in bars] == [150.0, 10.0]


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler (cc) to build probe_host.c")
def test_probe_host_drives_the_queue_from_python_and_from_c_on_the_simulator(tmp_path):
    """probe_host.py --sim: the Python methods, the queue's compiled host path (where it can be
    built), the inline Python stores, the per-message ctypes call and the C loop (probe_host.c)
    each bring every result back right, and the queue's books after the rounds that bypass the
    API let it drain: every message published by any of them is processed (warm-up + rounds, per
    host)."""
    r = run_script("probe_host.py", "--sim", "--iters", "20", "--rounds", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "probe_host.json").read_text())
    res, hosts = doc["results"], doc["hosts"]
    # the compiled host path needs Python's headers and a C compiler: where it is missing, the script says so
    assert hosts == ["python", "compiled", "inline", "ctypes", "c"] or (
        hosts == ["python", "inline", "ctypes", "c"] and "the compiled host not measured" in r.stdout
    ), hosts
    assert list(res) == ["two reads", "one read", "one read + scout"]
    for name, row in res.items():
        assert row["processed"] == len(hosts) * (5 + 2 * 20), (name, row["processed"])
        for host in hosts:
            assert row[host]["n"] == 40 and row[host]["wrong"] == 0, (name, host, row[host])
    assert (tmp_path / "probe_host.png").exists() or "matplotlib not installed" in r.stdout
    assert "wrong results: 0" in r.stdout
