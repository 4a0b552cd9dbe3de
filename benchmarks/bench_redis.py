#!/usr/bin/env python3
"""Track A vs the bridge vs the GPU queue alone, side by side in one run.

For each payload size (64 B, 512 B, 4 KB by default):
  track_a        producers -> Redis stream -> StreamWorker + BatchProcessor (H2D, one launch, D2H per
                 batch) -> result stream; plain entries (frame 1) and frame entries (--frame: messages
                 per entry, a comma list runs each; labels track_a_framed<F>)
  bridge         producers -> Redis stream -> GpuBridge -> GpuQueue (persistent kernel) -> result stream
Both Redis paths read --batch messages per XREADGROUP (batch // frame entries): Track A runs each
read as one launch, the bridge as one batch of enqueue_many into a queue of 2 x --batch slots (two
batches in flight).  Each run prints the frame and batch it used, and the consumer's host CPU per
message (its main thread; on --backend sim the simulator thread's CPU, which is not the GPU's, is
reported apart and left out).
  queue          GpuQueue alone from one Python thread: enqueue + take, pipelined
Three phases per path and size, one consumer process (it owns the GPU; this process never touches CUDA):
  unloaded   one message at a time, send -> result read back (XREAD BLOCK), --pings times
  saturated  --messages messages from --producers spawned producer processes, flat out; msg/s is
             timed from their common start to the last result visible in the result stream
  paced      the producers paced at --load × the saturated rate (about 2 s of it): latency
             send -> result visible under a steady load the pipeline can carry
Latencies are per message (sampled), CLOCK_MONOTONIC across processes; p50 / p99 in µs.  The
saturated phase's latencies are recorded too but measure the backlog.  Redis server time per
command (INFO commandstats) is taken over the saturated phase.
The consumer runs in a spawned process (it owns the GPU); this process never touches CUDA.
Writes <out>/bench_redis.json and <out>/bench_redis.png and prints a table.

    PYTHONPATH=. python benchmarks/bench_redis.py --out benchmarks/results            # GPU
    PYTHONPATH=. python benchmarks/bench_redis.py --backend sim --messages 20000      # dry run, no GPU
    # issue 9's must-show (bridge beside Track A, 64 B framed), ~1 minute on the H200 host:
    PYTHONPATH=. python benchmarks/bench_redis.py --sizes 64 --frame 32,128 --modes track_a_framed,bridge_framed,queue
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plotting import pyplot  # noqa: E402  (benchmarks/plotting.py)

from gpuq_driver.streams import RedisServer, StreamProducer, connect  # noqa: E402
from gpuq_driver.streams.wire import frames, items  # noqa: E402

STREAM, GROUP = "bench:in", "bench"
HDR = struct.Struct("<QQ")  # send time (CLOCK_MONOTONIC ns, system-wide), sequence number


def pct(values_ns) -> dict:
    a = np.asarray(values_ns, dtype=np.float64) / 1e3
    if not len(a):
        return {"n": 0}
    return {
        "n": int(len(a)),
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
    }


def slot_for(size: int) -> int:
    return max(64, -(-size // 16) * 16)


# -- processes -------------------------------------------------------------------------------------


def producer_main(url, n, first_seq, size, frame, rate, ready, go, done):
    """Once ``go`` is set: XADD ``n`` messages, paced at ``rate`` msg/s if given (in round trips
    of 8 entries, each stamped just before it is sent, after any pacing wait)."""
    client = connect(url)
    prod = StreamProducer(client, STREAM, maxlen=10_000_000, frame=frame, pipeline=8 if rate else 256)
    pad = b"\xab" * (size - HDR.size)
    chunk = prod.pipeline * frame
    ready.put(True)
    go.wait()
    start_at = time.monotonic()
    for s in range(first_seq, first_seq + n, chunk):
        if rate:
            wait = start_at + (s - first_seq) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        now = time.monotonic_ns()
        prod.send_many([HDR.pack(now, q) + pad for q in range(s, min(s + chunk, first_seq + n))])
    done.put(prod.sent_entries)


def read_shape(size: int, frame: int, batch: int) -> tuple[int, int]:
    """(entries per XREADGROUP, queue capacity): about ``batch`` messages (at most 4 MB of payload)
    a read; the bridge's ring holds two reads (a power of two)."""
    count = max(1, min(batch // frame, (4 << 20) // (size * frame)))
    return count, 1 << (2 * count * frame - 1).bit_length()


def consumer_main(url, mode, size, frame, batch, backend, ready, stop, done):
    """The GPU side, in its own process: StreamWorker + BatchProcessor or GpuBridge + GpuQueue."""
    from gpuq_driver import GpuQueue, QueueConfig
    from gpuq_driver.streams import BatchProcessor, GpuBridge, StreamConsumer, StreamWorker

    client = connect(url)
    count, capacity = read_shape(size, frame, batch)
    cons = StreamConsumer(
        client, STREAM, GROUP, f"bench-{os.getpid()}", count=count, block_ms=20, result_maxlen=10_000_000
    )
    sb = slot_for(size)
    if mode == "track_a":
        res = BatchProcessor(slot_bytes=sb, max_batch=max(8192, count * frame), backend=backend)
        worker = StreamWorker(cons, res)
    else:
        res = GpuQueue(QueueConfig(capacity=capacity, slot_bytes=sb, backend=backend))
        worker = GpuBridge(cons, res)
    sim = getattr(getattr(res, "_kernel", None), "_thread", None)  # the simulator's thread (--backend sim)
    ready.put(True)
    cpu = time.thread_time()
    try:
        stats = worker.run(stop=stop)
        cpu = time.thread_time() - cpu
        sim_cpu = time.clock_gettime(time.pthread_getcpuclockid(sim.ident)) if sim is not None else None
    finally:
        res.close()
    done.put({**vars(stats), "host_cpu_s": cpu, "sim_cpu_s": sim_cpu})


def queue_alone(size: int, n: int, backend: str, load: float, out) -> None:
    """GpuQueue alone, one thread: one message at a time; then saturated (up to 2048 in flight);
    then enqueues paced at ``load`` × the saturated rate.  Latency = enqueue -> result taken."""
    from gpuq_driver import GpuQueue, QueueConfig

    sb = slot_for(size)
    pad = b"\xab" * (size - HDR.size)
    with GpuQueue(QueueConfig(capacity=4096, slot_bytes=sb, backend=backend)) as q:
        for _ in range(200):  # warm-up
            q.wait_result(q.enqueue(HDR.pack(0, 0) + pad))
        pings = []
        for i in range(2000):
            t = time.monotonic_ns()
            q.wait_result(q.enqueue(HDR.pack(t, i) + pad))
            pings.append(time.monotonic_ns() - t)

        def flow(count, rate=None):
            lat, sent, got = [], 0, 0
            t0 = time.monotonic()
            while got < count:
                due = count if rate is None else min(count, int((time.monotonic() - t0) * rate) + 1)
                while sent < due and sent - got < 2048:
                    q.enqueue(HDR.pack(time.monotonic_ns(), sent) + pad)
                    sent += 1
                for msg_id in q.poll_completions():
                    r = q.try_dequeue_result(msg_id)
                    if msg_id % 4 == 0:
                        lat.append(time.monotonic_ns() - HDR.unpack_from(r)[0])
                    got += 1
            return count / (time.monotonic() - t0), lat

        rate, saturated = flow(n)
        paced_n = max(1000, min(n, int(rate * load * 2)))  # about 2 s
        paced_rate, paced = flow(paced_n, rate * load)
    out.put(
        {
            "msg_per_s": rate,
            "saturated": pct(saturated),
            "paced": {**pct(paced), "msg_per_s": paced_rate},
            "unloaded": pct(pings),
        }
    )


# -- one Redis run ---------------------------------------------------------------------------------


def _flow(ctx, url, client, last, n, size, frame, producers, rate):
    """Producers send ``n`` messages (paced at ``rate`` msg/s in all, or flat out); this process
    reads the results back.  Returns (last result id, msg/s, latencies in ns, received)."""
    results = f"{STREAM}:results"
    ready, go, pdone = ctx.Queue(), ctx.Event(), ctx.Queue()
    share = -(-n // producers)
    procs = [
        ctx.Process(
            target=producer_main,
            args=(
                url,
                min(share, n - k * share),
                k * share,
                size,
                frame,
                rate / producers if rate else None,
                ready,
                go,
                pdone,
            ),
        )
        for k in range(producers)
        if n - k * share > 0
    ]
    for p in procs:
        p.start()
    for _ in procs:  # started, imported, connected: the clock starts when they all are
        ready.get(timeout=120)
    start_at = time.monotonic()
    go.set()
    got, lat, t_end = 0, [], None
    deadline = start_at + 300
    while got < n and time.monotonic() < deadline:
        reply = client.xread({results: last}, count=200, block=1000)
        if not reply:
            continue
        now = time.monotonic_ns()
        for rid, fields in reply[0][1]:
            last = rid
            for k, (lens, data) in enumerate(frames(fields[b"r"])):
                got += len(lens)
                if k % 4 == 0:  # sample: decoding every result would slow this reader down
                    lat += [now - HDR.unpack_from(r)[0] for r in items(lens, data) if r is not None]
        t_end = time.monotonic()
    for p in procs:
        p.join(60)
    return last, (n / (t_end - start_at) if got >= n else float("nan")), lat, got


def redis_run(ctx, url, mode, size, frame, batch, n, producers, pings, load, backend) -> dict:
    client = connect(url, socket_timeout_s=30)
    client.flushall()
    ready, stop, done = ctx.Queue(), ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=consumer_main, args=(url, mode, size, frame, batch, backend, ready, stop, done))
    consumer.start()
    ready.get(timeout=120)
    pad = b"\xab" * (size - HDR.size)
    results = f"{STREAM}:results"
    # unloaded: one plain entry at a time, send -> result read back
    single = StreamProducer(client, STREAM, maxlen=10_000_000)
    last, unloaded = b"0", []
    for i in range(pings):
        t = time.monotonic_ns()
        single.send(HDR.pack(t, i) + pad)
        while True:
            reply = client.xread({results: last}, count=1, block=1000)
            if reply:
                last = reply[0][1][-1][0]
                break
        unloaded.append(time.monotonic_ns() - t)
    client.config_resetstat()
    last, rate, saturated, got = _flow(ctx, url, client, last, n, size, frame, producers, None)
    cmd = {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}
    paced_n = max(1000, min(n, int(rate * load * 2))) if rate == rate else 0  # about 2 s
    last, paced_rate, paced, _ = (
        _flow(ctx, url, client, last, paced_n, size, frame, producers, rate * load)
        if paced_n
        else (last, float("nan"), [], 0)
    )
    stop.set()
    stats = done.get(timeout=60)
    consumer.join(30)
    keep = ("xadd", "xreadgroup", "evalsha", "xread", "xautoclaim")
    count, capacity = read_shape(size, frame, batch)
    return {
        "mode": mode,
        "size": size,
        "frame": frame,
        "entries_per_read": count,
        "messages_per_read": count * frame,
        "queue_capacity": capacity if mode == "bridge" else None,
        "host_us_per_msg": stats["host_cpu_s"] / max(1, stats["messages"]) * 1e6,
        "messages": n,
        "received": got,
        "msg_per_s": rate,
        "saturated": pct(saturated),
        "paced": {**pct(paced), "msg_per_s": paced_rate},
        "unloaded": pct(unloaded),
        "worker": stats,
        "redis_usec_per_call": {k: cmd[k]["usec_per_call"] for k in keep if k in cmd},
        "redis_calls": {k: cmd[k]["calls"] for k in keep if k in cmd},
    }


def plot(res: dict, path: Path) -> None:
    plt = pyplot(" (make it later: bench_redis.py --replot bench_redis.json)")
    if plt is None:
        return
    rows = res["runs"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    panels = (
        ("saturated throughput, k msg/s", lambda r: r["msg_per_s"] / 1e3, False),
        (
            f"p50 µs, paced at {res['env'].get('load', 0.5):g} × saturated (log)",
            lambda r: r["paced"].get("p50_us", 0),
            True,
        ),
        ("p50 µs, one message at a time (log)", lambda r: r["unloaded"].get("p50_us", 0), True),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    w = 0.8 / len(labels)
    for ax, (title, value, log) in zip(axes, panels):
        for j, lab in enumerate(labels):
            by = {r["size"]: r for r in rows if r["label"] == lab}
            ax.bar(
                [i + j * w for i in range(len(sizes))], [value(by[s]) if s in by else 0 for s in sizes], w, label=lab
            )
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(sizes))], [f"{s} B" for s in sizes])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Track A vs bridge vs GpuQueue alone — {res['env']['device']}, Redis {res['env']['redis']}, "
        f"{res['env']['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Track A (Redis + per-batch launch) vs bridge vs GpuQueue alone")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="default: an embedded redis-server")
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument(
        "--max-mb", type=int, default=1024, help="fewer messages for large payloads: at most this many MB a run"
    )
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--frame", default="32", help="messages per entry for the framed runs (a comma list runs each)")
    ap.add_argument("--batch", type=int, default=4096, help="messages per XREADGROUP (batch // frame entries)")
    ap.add_argument("--sizes", default="64,512,4096")
    ap.add_argument("--pings", type=int, default=300)
    ap.add_argument("--load", type=float, default=0.5, help="paced phase: this fraction of the saturated rate")
    ap.add_argument("--modes", default="track_a,track_a_framed,bridge,bridge_framed,queue")
    ap.add_argument("--backend", choices=["cuda", "sim"], default="cuda", help="sim: no GPU, a dry run")
    ap.add_argument("--cpu", action="store_true", help="the same as --backend sim")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier run's JSON")
    args = ap.parse_args()
    cpu = args.cpu or args.backend == "sim"  # Track A on BatchProcessor's numpy backend, the queue on the simulator
    frames_ = [int(f) for f in str(args.frame).split(",")]
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    server = None if args.redis_url else RedisServer()
    url = args.redis_url or server.url
    version = connect(url).info("server")["redis_version"]
    env = {"device": "CPU dry run"} if cpu else _device_env()
    device = env["device"]
    env.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "redis": version,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "producers": args.producers,
            "messages": args.messages,
            "load": args.load,
            "frame": frames_,
            "batch": args.batch,
        }
    )
    print(
        f"Redis {version} at {url}; {device}; {args.producers} producer processes; {args.messages:,} messages per run"
    )
    runs = []
    modes = args.modes.split(",")
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            n = max(1000, min(args.messages, (args.max_mb << 20) // size))
            runs_here = [(m, f) for m in modes for f in (frames_ if m.endswith("_framed") else [1])]
            for mode, frame in runs_here:
                label = mode + (str(frame) if mode.endswith("_framed") and len(frames_) > 1 else "")
                if mode == "queue":
                    q = ctx.Queue()
                    p = ctx.Process(target=queue_alone, args=(size, n, "sim" if cpu else "cuda", args.load, q))
                    p.start()
                    r = {"mode": "queue", "size": size, "frame": None, "messages": n, **q.get(timeout=300)}
                    p.join(30)
                else:
                    base = mode.removesuffix("_framed")
                    backend = ("numpy" if base == "track_a" else "sim") if cpu else "cuda"
                    r = redis_run(
                        ctx,
                        url,
                        base,
                        size,
                        frame,
                        args.batch,
                        n,
                        args.producers,
                        args.pings,
                        args.load,
                        backend,
                    )
                r["label"] = label
                runs.append(r)
                if "entries_per_read" in r:
                    w = r["worker"]
                    sim_cpu = (
                        f"; simulator thread {w['sim_cpu_s'] / max(1, w['messages']) * 1e6:.2f} µs/msg (not counted)"
                        if w.get("sim_cpu_s") is not None
                        else ""
                    )
                    print(
                        f"{label:15s} {size:5d} B  frame {frame} messages/entry, {r['entries_per_read']} entries "
                        f"({r['messages_per_read']} messages) per XREADGROUP"
                        + (f", queue capacity {r['queue_capacity']}" if r["queue_capacity"] else "")
                        + f"; consumer host CPU {r['host_us_per_msg']:.2f} µs/msg{sim_cpu}",
                        flush=True,
                    )
                pc = r["paced"]
                print(
                    f"{label:15s} {size:5d} B  {r['msg_per_s']:>11,.0f} msg/s  at {pc.get('msg_per_s', 0):>9,.0f} msg/s: p50 "
                    f"{pc.get('p50_us', float('nan')):9.1f} p99 {pc.get('p99_us', float('nan')):9.1f} µs"
                    f"  unloaded p50 {r['unloaded']['p50_us']:8.1f} p99 {r['unloaded']['p99_us']:8.1f} µs"
                    + (f"  redis µs/call {r['redis_usec_per_call']}" if "redis_usec_per_call" in r else ""),
                    flush=True,
                )
    finally:
        if server:
            server.close()
    res = {"env": env, "runs": runs}
    (out / "bench_redis.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "bench_redis.png")
    print(f"wrote {out / 'bench_redis.json'}")
    return 0


def _device_env() -> dict:
    """The device and versions (cuInit in this process: fine, the children are spawned, not forked)."""
    from importlib.metadata import version

    from gpuq_driver import device_info, driver
    from gpuq_driver.compiler import nvrtc_version

    info = device_info(0)
    return {
        "device": info.name,
        "arch": info.arch,
        "driver": int(driver.check(driver._driver().cuDriverGetVersion())),
        "cuda_bindings": version("cuda-bindings"),
        "nvrtc": "{}.{}".format(*nvrtc_version()),
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
