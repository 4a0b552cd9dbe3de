"""Session 14 A/B: enqueue's adaptive slot check (one_read) against checking every message and
against two reads; enqueue rate (interleaved rounds) and 64 B / 512 B / 4 KB round trips."""
import json, os, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from benchmarks import bench_latency as bl
from gpuq_driver import GpuQueue, QueueConfig

FORCE = 1 << 62
SIM = {"backend": "sim"} if os.environ.get("BACKEND") == "sim" else {}


def enq(n, cap, depth, **cfg):
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(1024)]
    with GpuQueue(QueueConfig(capacity=cap, slot_bytes=64, **cfg, **SIM)) as q:
        q._check_depth = depth
        enqueue = q.enqueue
        for p in payloads:
            q.wait_result(enqueue(p))
        t0 = time.perf_counter()
        for i in range(n):
            enqueue(payloads[i & 1023])
        dt = time.perf_counter() - t0
        bad = 0
        take = q.try_dequeue_result
        for mid in range(1024, 1024 + n):
            r = take(mid)
            while r is None:
                r = take(mid)
            bad += r != payloads[(mid - 1024) & 1023]
        q.shutdown()
        st = q.stats()
    return n / dt, bad, st.spec_reads, st.spec_retries


def main():
    out = Path(os.environ.get("OUT", "/tmp/ab"))
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        pass
    t0 = time.perf_counter()
    for _ in range(1_000_000):
        pass
    res = {"empty_loop_ns": round((time.perf_counter() - t0) * 1e3, 1)}
    print("empty loop ns", res["empty_loop_ns"], flush=True)
    cfgs = {
        "two_reads": (2, {}),
        "one_read_adaptive": (2, {"one_read": True}),
        "one_read_every": (FORCE, {"one_read": True}),
        "two_reads_never": (2, {"lease_ms": float("inf")}),
        "one_read_adaptive_never": (2, {"one_read": True, "lease_ms": float("inf")}),
    }
    runs = {k: [] for k in cfgs}
    n, rounds = int(os.environ.get("N", 1_000_000)), 4
    cap = 1 << 20
    for r in range(rounds):
        for name, (depth, cfg) in cfgs.items():
            rate, bad, sr, srt = enq(n // rounds, cap, depth, **cfg)
            runs[name].append((rate, bad, sr, srt))
            print(f"round {r} {name}: {rate:,.0f} msg/s bad {bad} spec_reads {sr} retries {srt}", flush=True)
    res["enqueue"] = {k: {"rounds": v, "median": sorted(x[0] for x in v)[len(v) // 2]} for k, v in runs.items()}
    for k, v in res["enqueue"].items():
        print(f"enqueue {k}: median {v['median']:,.0f} msg/s", flush=True)
    bl.queue_round_trip(64, int(os.environ.get("ITERS", 12000)) // 4, **SIM)  # warm-up
    lat = {}
    for size in (64, 512, 4096):
        c = {"": {**SIM}, "_one_read": {"one_read": True, **SIM}}
        if size == 64:
            c["_one_read_never"] = {"one_read": True, "lease_ms": float("inf"), **SIM}
            c["_one_read_scout_never"] = {"one_read": True, "scouts": 1, "lease_ms": float("inf"), **SIM}
        for name, r in bl.round_trips_interleaved(size, int(os.environ.get("ITERS", 12000)), c).items():
            lat[f"{size}B{name}"] = r
    res["latency"] = lat
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(res, indent=1, default=str))


main()
