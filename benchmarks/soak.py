#!/usr/bin/env python3
"""Soak test: one GpuQueue under steady traffic for minutes, beside another CUDA user in the process.

  producers   --producers threads enqueue messages of mixed sizes (60 % 0-64 B, 30 % 64-512 B,
              10 % 512 B-slot_bytes), flat out; each payload starts with (producer, seq) and goes on
              with a slice of a random pool; QueueFull is retried
  consumers   --consumers threads poll_completions() + try_dequeue_result(); every result is
              checked byte for byte against what was sent (a dict msg_id -> (send time, payload));
              round trip = the enqueue call that succeeded -> result taken (includes the wait for a
              free slot: under this load it is mostly time spent queued in a full ring)
  neighbour   every --neighbour-period-ms, torch or CuPy in the same process: a 64 MB tensor, a
              1024x1024 float32 matmul, synchronize (its wait is recorded), free, empty the cache
  sampler     every --interval-s: msg/s, MB/s, round trip p50/p99, neighbour sync wait, RSS,
              device VRAM used (cuMemGetInfo), q.stats()
At the end the producers stop, the consumers take every result, the queue is closed, and the
verdict is printed: SOAK OK (nothing lost, duplicated or wrong; exit 0) or SOAK FAILED (exit 1).
Writes <out>/soak.json and <out>/soak.png.

    python benchmarks/soak.py --duration 300 --out benchmarks/results                    # GPU
    python benchmarks/soak.py --backend sim --duration 5 --neighbour none --slot-bytes 512 --capacity 256
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plotting import pyplot  # noqa: E402  (benchmarks/plotting.py)

import gpuq_driver  # noqa: E402
from gpuq_driver import CudaUnavailable, GpuQueue, QueueConfig, QueueFull  # noqa: E402

EDGES = np.logspace(2, 11, 1801)  # round-trip histogram, 100 ns .. 100 s (1.2 % wide bins)
DRAIN_S = 60.0  # how long the consumers may take to drain after the producers stop


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def vram_mib(backend: str) -> float | None:
    if backend != "cuda":
        return None
    from cuda.bindings import driver as cu

    from gpuq_driver import driver
    from gpuq_driver.errors import check

    driver.primary_context(0)  # the queue's context, current in this thread
    free, total = check(cu.cuMemGetInfo(), "cuMemGetInfo")
    return (int(total) - int(free)) / 2**20


def pct(a, q) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


def hist_pct(counts, q) -> float | None:
    """Percentile q (µs) of the round-trip histogram: the geometric middle of its bin."""
    c = np.cumsum(counts)
    if not c[-1]:
        return None
    i = int(np.searchsorted(c, q / 100 * c[-1]))
    return float(np.sqrt(EDGES[i] * EDGES[i + 1])) / 1e3


def neighbour_step(kind: str):
    """One iteration of the neighbour's CUDA work: () -> its synchronize wait (s); and the library's version."""
    if kind == "torch":
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch.cuda.is_available() is False")
        ones, rand = (lambda: torch.ones(16 << 20, device="cuda")), (lambda: torch.rand(1024, 1024, device="cuda"))
        sync, free, version = torch.cuda.synchronize, torch.cuda.empty_cache, torch.__version__
    else:
        import cupy as cp

        ones, rand = (lambda: cp.ones(16 << 20, cp.float32)), (lambda: cp.random.random((1024, 1024), cp.float32))
        sync, free, version = cp.cuda.Device().synchronize, cp.get_default_memory_pool().free_all_blocks, cp.__version__

    def step():  # 64 MB of float32 and a 1024 x 1024 matmul, synchronize (timed), free, empty the cache
        x, a = ones(), rand()
        b = a @ a
        t = time.perf_counter()
        sync()
        wait = time.perf_counter() - t
        del x, a, b
        free()
        return wait

    return step, version


class Soak:
    def __init__(self, q: GpuQueue, args):
        self.q, self.args = q, args
        self.lock = threading.Lock()
        self.sent: dict[int, tuple[int, bytes]] = {}  # msg_id -> (send ns, payload), until taken
        self.orphans: dict[int, tuple[int, bytes]] = {}  # taken before its producer registered it
        self.n_sent = self.taken = self.ok = self.wrong = self.dup = self.none = self.full_retries = 0
        self.bytes_ok = 0
        self.iv_rtt, self.iv_bytes, self.iv_sync = [], 0, []  # this interval's
        self.hist, self.syncs, self.iters = np.zeros(len(EDGES) - 1, np.int64), [], []
        self.errors: list[str] = []
        self.stop, self.producers_done, self.nb_stop = threading.Event(), threading.Event(), threading.Event()
        rng = random.Random(args.seed)
        self.pool = rng.randbytes((1 << 20) + args.slot_bytes)

    def guarded(self, fn, *a):
        try:
            fn(*a)
        except Exception as exc:  # a soak reports, it does not crash
            self.errors.append(f"{threading.current_thread().name}: {exc!r}")
            self.stop.set()

    def producer(self, pid: int) -> None:
        rng, sb, pool, q = random.Random(self.args.seed * 1000 + pid + 1), self.args.slot_bytes, self.pool, self.q
        seq = 0
        while not self.stop.is_set():
            r = rng.random()
            lo, hi = (0, 64) if r < 0.6 else (64, 512) if r < 0.9 else (512, sb)
            n = rng.randint(min(lo, sb), min(hi, sb))
            off = rng.randrange(1 << 20)
            payload = (((pid << 48) | seq).to_bytes(8, "little") + pool[off : off + n])[:n]
            seq += 1
            while True:
                t0 = time.perf_counter_ns()
                try:
                    mid = q.enqueue(payload, timeout=0.1)
                    break
                except QueueFull:
                    with self.lock:
                        self.full_retries += 1
                    if self.stop.is_set():
                        return
            with self.lock:
                self.n_sent += 1
                taken = self.orphans.pop(mid, None)
                if taken is None:
                    self.sent[mid] = (t0, payload)
            if taken is not None:
                self.check([(t0, payload, *taken)])

    def consumer(self) -> None:
        q, deadline = self.q, None
        while True:
            ids = q.poll_completions()
            if not ids:
                if self.producers_done.is_set():
                    deadline = deadline or time.monotonic() + DRAIN_S
                    if self.taken >= self.n_sent or time.monotonic() > deadline:
                        return
                time.sleep(50e-6)
                continue
            got, none = [], 0
            for mid in ids:
                data = q.try_dequeue_result(mid)
                if data is None:
                    none += 1
                else:
                    got.append((mid, time.perf_counter_ns(), data))
            pairs = []
            with self.lock:
                self.none += none
                self.taken += len(got)
                for mid, t, data in got:
                    e = self.sent.pop(mid, None)
                    if e is not None:
                        pairs.append((*e, t, data))
                    elif mid in self.orphans:
                        self.dup += 1
                    else:  # its producer has not registered it yet (or: taken twice; see summary)
                        self.orphans[mid] = (t, data)
            self.check(pairs)

    def check(self, pairs) -> None:
        ok = [d == p for _, p, _, d in pairs]
        nbytes = sum(len(p) for _, p, _, _ in pairs)
        with self.lock:
            self.ok += sum(ok)
            self.wrong += len(ok) - sum(ok)
            self.bytes_ok += nbytes
            self.iv_bytes += nbytes
            self.iv_rtt.extend(t1 - t0 for t0, _, t1, _ in pairs)

    def neighbour(self, step) -> None:
        period, nxt = self.args.neighbour_period_ms / 1e3, time.monotonic()
        while not self.nb_stop.is_set():
            t = time.perf_counter()
            wait_ms = step() * 1e3
            with self.lock:
                self.iv_sync.append(wait_ms)
                self.syncs.append(wait_ms)
                self.iters.append((time.perf_counter() - t) * 1e3)
            nxt = max(nxt + period, time.monotonic())
            self.nb_stop.wait(nxt - time.monotonic())

    def sample(self, elapsed: float, dt: float) -> dict:
        with self.lock:
            rtt, nbytes, sync = np.asarray(self.iv_rtt, np.float64), self.iv_bytes, self.iv_sync
            self.iv_rtt, self.iv_bytes, self.iv_sync = [], 0, []
        self.hist += np.histogram(np.clip(rtt, EDGES[0], EDGES[-1] - 1), EDGES)[0]
        s = self.q.stats()
        return {
            "t_s": round(elapsed, 3),
            "messages": int(rtt.size),
            "msg_per_s": rtt.size / dt,
            "MB_per_s": nbytes / dt / 1e6,
            "rtt_p50_us": pct(rtt / 1e3, 50),
            "rtt_p99_us": pct(rtt / 1e3, 99),
            "sync_p50_ms": pct(sync, 50),
            "sync_max_ms": max(sync, default=None),
            "sync_n": len(sync),
            "rss_mib": rss_mib(),
            "vram_mib": vram_mib(self.args.backend),
            "launches": s.launches,
            "exits": s.exits,
            "pauses": s.pauses,
            "pending": s.pending,
            "occupied": s.occupied,
        }


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    ser, nb = res["series"], res["config"]["neighbour_used"] != "none"
    t = [r["t_s"] for r in ser]
    col = lambda k: [np.nan if r[k] is None else r[k] for r in ser]  # noqa: E731
    fig, axes = plt.subplots(3 + nb, 1, figsize=(10, 2.6 * (3 + nb)), sharex=True)
    axes[0].plot(t, col("msg_per_s"), color="tab:blue")
    axes[0].set_ylabel("messages / s")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(t, col("rtt_p50_us"), label="p50")
    axes[1].plot(t, col("rtt_p99_us"), label="p99")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("round trip, µs")
    axes[1].legend(loc="best")
    sm = res["summary"]
    axes[2].plot(
        t, col("rss_mib"), color="tab:green", label=f"RSS ({sm['rss_start_mib']:.0f} -> {sm['rss_end_mib']:.0f} MiB)"
    )
    axes[2].set_ylabel("RSS, MiB")
    if res["config"]["backend"] == "cuda":
        ax = axes[2].twinx()
        ax.plot(
            t,
            col("vram_mib"),
            color="tab:purple",
            label=f"VRAM used, device ({sm['vram_start_mib']:.0f} -> {sm['vram_end_mib']:.0f} MiB)",
        )
        ax.set_ylabel("VRAM used, MiB")
        ax.legend(loc="lower right")
    axes[2].legend(loc="best")
    if nb:
        axes[3].plot(t, col("sync_max_ms"), color="tab:red", label="max")
        axes[3].plot(t, col("sync_p50_ms"), color="tab:orange", label="p50")
        axes[3].set_ylabel(f"{res['config']['neighbour_used']} sync wait, ms")
        axes[3].legend(loc="upper right")
    axes[-1].set_xlabel("time, s")
    c = res["config"]
    fig.suptitle(
        f"gpuq soak on {res['versions'].get('device', 'the CPU simulator')}: {c['producers']} producers, "
        f"{c['consumers']} consumers, ring {c['capacity']} x {c['slot_bytes']} B, lease {c['lease_ms']} ms, "
        f"neighbour {c['neighbour_used']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description="GpuQueue soak test: traffic, checks, memory, a CUDA neighbour")
    ap.add_argument("--duration", type=float, default=300, help="seconds of traffic")
    ap.add_argument("--backend", choices=("cuda", "sim"), default="cuda")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--slot-bytes", type=int, default=4096)
    ap.add_argument("--neighbour", choices=("torch", "cupy", "none"), default="torch")
    ap.add_argument("--neighbour-period-ms", type=float, default=100)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--interval-s", type=float, default=1.0, help="sampling interval of the time series")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    versions = {"python": platform.python_version(), "numpy": np.__version__, "gpuq_driver": gpuq_driver.__version__}
    try:
        q = GpuQueue(QueueConfig(capacity=args.capacity, slot_bytes=args.slot_bytes, backend=args.backend))
    except CudaUnavailable as exc:
        print(f"no GPU here ({exc}); --backend sim runs on the CPU simulator")
        return 2
    if args.backend == "cuda":
        from importlib.metadata import version

        versions.update(device=gpuq_driver.device_info(0).name, cuda_bindings=version("cuda-bindings"))
    st, step, note = Soak(q, args), None, None
    if args.neighbour != "none":
        try:
            step, versions[args.neighbour] = neighbour_step(args.neighbour)
            step()  # warm-up: CUDA / cuBLAS set-up of the library, not timed
        except ImportError as exc:
            note = f"--neighbour {args.neighbour} unavailable ({exc}): running without a neighbour"
            print("note:", note)
    config = {
        **vars(args),
        "lease_ms": q.config.lease_ms,
        "neighbour_used": args.neighbour if step else "none",
        "neighbour_note": note,
    }
    rss0, vram0 = rss_mib(), vram_mib(args.backend)

    threads = [
        threading.Thread(target=st.guarded, args=(st.producer, i), name=f"producer-{i}") for i in range(args.producers)
    ]
    threads += [
        threading.Thread(target=st.guarded, args=(st.consumer,), name=f"consumer-{i}") for i in range(args.consumers)
    ]
    if step:
        threads.append(threading.Thread(target=st.guarded, args=(st.neighbour, step), name="neighbour"))
    series, t0 = [], time.perf_counter()
    for th in threads:
        th.start()
    last = t0
    try:  # Ctrl-C ends the traffic early; the drain and the report still run
        while (now := time.perf_counter()) - t0 < args.duration and not st.stop.is_set():
            time.sleep(max(0.0, min(last + args.interval_s, t0 + args.duration) - now))
            now = time.perf_counter()
            series.append(st.sample(now - t0, now - last))
            last = now
            r = series[-1]
            nb = f"  sync max {r['sync_max_ms'] or 0:6.1f} ms" if step else ""
            print(
                f"{r['t_s']:7.1f} s  {r['msg_per_s']:9,.0f} msg/s  p99 {r['rtt_p99_us'] or 0:9.0f} µs{nb}  "
                f"RSS {r['rss_mib']:6.0f} MiB",
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: stopping the producers and draining")
    t_traffic = time.perf_counter() - t0
    st.stop.set()
    for th in threads[: args.producers]:
        th.join()
    st.producers_done.set()
    for th in threads[args.producers : args.producers + args.consumers]:
        th.join()
    st.nb_stop.set()
    for th in threads:
        th.join()
    now = time.perf_counter()
    drain = st.sample(now - t0, now - last)  # not in the series: its interval is the drain
    rss1, vram1, stats = rss_mib(), vram_mib(args.backend), q.stats()
    q.close()

    syncs = np.asarray(st.syncs)
    summary = {
        "sent": st.n_sent,
        "received": st.ok + st.wrong,
        "lost": len(st.sent),
        "duplicated": st.dup + len(st.orphans),
        "wrong": st.wrong,
        "none_results": st.none,
        "thread_errors": st.errors,
        "queue_full_retries": st.full_retries,
        "traffic_s": t_traffic,
        "drain_s": time.perf_counter() - t0 - t_traffic,
        "msg_per_s": st.ok / t_traffic,
        "MB_per_s": st.bytes_ok / t_traffic / 1e6,
        "rtt_p50_us": hist_pct(st.hist, 50),
        "rtt_p99_us": hist_pct(st.hist, 99),
        "sync_p50_ms": pct(syncs, 50),
        "sync_p99_ms": pct(syncs, 99),
        "sync_max_ms": pct(syncs, 100),
        "neighbour_iterations": len(st.iters),
        "iteration_p50_ms": pct(st.iters, 50),
        "iteration_max_ms": pct(st.iters, 100),
        "rss_start_mib": rss0,
        "rss_end_mib": rss1,
        "vram_start_mib": vram0,
        "vram_end_mib": vram1,
        "lease_launches": stats.launches,
        "lease_exits": stats.exits,
    }
    res = {"config": config, "versions": versions, "series": series, "drain_sample": drain, "summary": summary}
    (out / "soak.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "soak.png")

    fmt = lambda v: "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"  # noqa: E731
    print(
        f"\n{versions.get('device', 'CPU simulator')}, lease {q.config.lease_ms} ms, "
        f"neighbour {config['neighbour_used']}"
    )
    rows = [(k, fmt(v)) for k, v in summary.items() if k != "thread_errors"]
    for i in range(0, len(rows), 2):
        print("".join(f"  {k:22s}{v:>14s}  " for k, v in rows[i : i + 2]))
    for e in st.errors:
        print("  thread error:", e)
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    bad = {k: summary[k] for k in ("lost", "duplicated", "wrong", "none_results") if summary[k]}
    if st.errors:
        bad["thread_errors"] = len(st.errors)
    print("SOAK OK" if not bad else "SOAK FAILED " + " ".join(f"{k}={v}" for k, v in bad.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
