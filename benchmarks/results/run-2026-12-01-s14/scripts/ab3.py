"""Session 14 A/B 2: the polls' hint (GpuqDevState.unchecked) against the slot in every poll
(GPUQ_POLL_HINT_OFF), with enqueue's adaptive check in both; enqueue rate and round trips."""
import functools, json, os, sys, time
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_latency as bl
from gpuq_driver import GpuQueue, QueueConfig, compiler, kernel

SIM = {"backend": "sim"} if os.environ.get("BACKEND") == "sim" else {}


def config(**k):
    off = k.pop("hint_off", False)
    kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=("GPUQ_POLL_HINT_OFF",) if off else ())
    return QueueConfig(**k, **SIM)


bl.QueueConfig = config


def enq(n, cap, every=False, **cfg):
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(1024)]
    with GpuQueue(config(capacity=cap, slot_bytes=64, **cfg)) as q:
        if every:
            q._check_depth = 1 << 62
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
    out = Path(os.environ.get("OUT", "/tmp/ab3"))
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        pass
    t0 = time.perf_counter()
    for _ in range(1_000_000):
        pass
    res = {"empty_loop_ns": round((time.perf_counter() - t0) * 1e3, 1)}
    print("empty loop ns", res["empty_loop_ns"], flush=True)
    cfgs = {
        "two_reads": {},
        "one_read_hint": {"one_read": True},
        "one_read_every": {"one_read": True, "every": True},
    }
    runs = {k: [] for k in cfgs}
    n, rounds = int(os.environ.get("N", 1_000_000)), int(os.environ.get("ROUNDS", 6))
    for r in range(rounds):
        for name, cfg in cfgs.items():
            rate, bad, sr, srt = enq(n // rounds, 1 << 20, **cfg)
            runs[name].append((rate, bad, sr, srt))
            print(f"round {r} {name}: {rate:,.0f} msg/s bad {bad} spec_reads {sr} retries {srt}", flush=True)
    res["enqueue"] = {k: {"rounds": v, "median": sorted(x[0] for x in v)[len(v) // 2]} for k, v in runs.items()}
    for k, v in res["enqueue"].items():
        print(f"enqueue {k}: median {v['median']:,.0f} msg/s", flush=True)
    it = int(os.environ.get("ITERS", 12000))
    bl.queue_round_trip(64, it // 4)  # warm-up
    lat = {}
    for size in (64, 512, 4096):
        c = {"": {}, "_one_read": {"one_read": True}}
        for name, r in bl.round_trips_interleaved(size, it, c).items():
            lat[f"{size}B{name}"] = r
    res["latency"] = lat
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab3.json").write_text(json.dumps(res, indent=1, default=str))


main()
