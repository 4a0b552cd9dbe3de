#!/usr/bin/env python3
"""Print a dated benchmarks/NOTES.md entry from one gpu_session.sh run's folder (pytest.log,
example.log, bench_latency.json).  Usage: python benchmarks/notes_entry.py OUT_DIR >> benchmarks/NOTES.md"""

import json
import re
import sys
from pathlib import Path


def last_line(path: Path, pattern: str) -> str:
    if not path.exists():
        return "(missing)"
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if re.search(pattern, ln)]
    return lines[-1].strip() if lines else "(not found)"


def main() -> None:
    out = Path(sys.argv[1])
    bench = json.loads((out / "bench_latency.json").read_text()) if (out / "bench_latency.json").exists() else {}
    env = bench.get("env", {})
    if not env and (out / "bench_redis.json").exists():  # a run without the latency benchmark
        env = json.loads((out / "bench_redis.json").read_text())["env"]
    if not env and (out / "bench_batch.json").exists():
        env = json.loads((out / "bench_batch.json").read_text())["env"]
    print(f"\n## {env.get('date', '(no benchmark)')} — {env.get('device', '?')} ({env.get('arch', '?')})\n")
    print(
        f"- versions: driver {env.get('driver')}, cuda-bindings {env.get('cuda_bindings')}, NVRTC {env.get('nvrtc')}, "
        f"Python {env.get('python')}, numpy {env.get('numpy')}; empty Python loop {env.get('python_empty_loop_ns')} ns/iteration"
    )
    print(f"- nvidia-smi: {(out / 'nvidia-smi.txt').read_text().strip() if (out / 'nvidia-smi.txt').exists() else '?'}")
    print(f"- GPU tests: `{last_line(out / 'pytest.log', r'(passed|failed|error)')}`")
    ex = out / "example.log"
    for pat in ("^messages:", "^throughput:", "^round trip", "^(OK|FAILED)"):
        print(f"- example: `{last_line(ex, pat)}`")
    for mode in ("batch", "bridge"):
        log = out / f"redis_example_{mode}.log"
        if log.exists():
            print(
                f"- redis_consumer.py --mode {mode} --backend cuda: "
                + "; ".join(
                    f"`{ln.strip()}`" for ln in log.read_text(errors="replace").splitlines()[-12:] if ln.strip()
                )
            )
    if bench:
        print(
            "\n| round trip, one message at a time (gpuq: enqueue → result readable; then → taken) "
            "| p50 µs | p99 µs | taken p50 µs | taken p99 µs |\n|---|---:|---:|---:|---:|"
        )
        for k, v in bench["latency"].items():
            tk = f"{v['taken_p50_us']:.2f} | {v['taken_p99_us']:.2f}" if "taken_p50_us" in v else "– | –"
            print(f"| {k} | {v['p50_us']:.2f} | {v['p99_us']:.2f} | {tk} |")
        for suffix, label in (("", ""), ("_never_leaves", ", lease_ms=inf (never leaves)")):
            if "enqueue_throughput" + suffix not in bench:
                continue
            e, s = bench["enqueue_throughput" + suffix], bench["sustained_one_thread" + suffix]
            print(
                f"\n- enqueue from one Python thread, 64 B, {e['messages']:,} messages into a ring of {e['capacity']:,}"
                f"{label}: **{e['enqueue_msg_per_s']:,.0f} msg/s** ({e['enqueue_ns_per_msg']:.0f} ns/msg); "
                f"taking the results: {e['take_msg_per_s']:,.0f} msg/s; mismatches {e['mismatches']}; "
                f"launches {e.get('launches', '?')}"
            )
            print(
                f"- enqueue + take interleaved in one thread, ring 1024{label}: {s['msg_per_s']:,.0f} msg/s; "
                f"mismatches {s['mismatches']}"
            )
        if "pause_resume" in bench:
            pr = bench["pause_resume"]
            print(
                f"- pause(): p50 {pr['pause']['p50_us']:.1f} µs, p99 {pr['pause']['p99_us']:.1f} µs; "
                f"resume(): p50 {pr['resume']['p50_us']:.1f} µs"
            )
    plugins = out / "bench_plugins.log"
    if plugins.exists():  # its table, as printed
        print("\n### The scoring plugin: GpuQueue vs BatchProcessor vs CuPy (bench_plugins.py)\n")
        print("```\n" + plugins.read_text(errors="replace").strip() + "\n```")
    share = out / "bench_share.log"
    if share.exists():  # its tables, as printed
        print("\n### Other CUDA work beside a queue (bench_share.py)\n")
        print(
            "\n".join(
                ln
                for ln in share.read_text(errors="replace").splitlines()
                if ln.startswith("|") or ln.startswith("traffic beside") or not ln.strip()
            ).strip()
        )
    soak = out / "soak.log"
    if soak.exists():  # its closing summary, as printed
        lines = soak.read_text(errors="replace").splitlines()
        start = max((i for i, ln in enumerate(lines) if "lease" in ln and "neighbour" in ln), default=len(lines) - 25)
        print("\n### Soak (soak.py)\n\n```\n" + "\n".join(lines[start:]) + "\n```")
    batch_table(out / "bench_batch.json")
    redis_table(out / "bench_redis.json")


def batch_table(path: Path) -> None:
    """The batch calls (bench_batch.py), if it ran: the best of each path per message size, the 64 B
    end-to-end figures, asyncio and the per-message API."""
    if not path.exists():
        return
    r = json.loads(path.read_text())
    print("\n### Batch calls (bench_batch.py), one Python thread\n")
    for x in sorted(r.get("e2e64", []), key=lambda x: -x["msg_per_s"])[:6]:
        print(
            f"- 64 B end to end, {x['path']}, batch {x['batch']}, {x['warps']} warps: "
            f"**{x['msg_per_s'] / 1e6:.2f} M msg/s**, mismatches {x['mismatches']}"
        )
    rows = r.get("sweep", []) + r.get("baselines", [])
    if rows:
        print("\n| path | size B | best batch | M msg/s | GB/s each way | mismatches |\n|---|---:|---:|---:|---:|---:|")
        best: dict = {}
        for x in rows:
            key = (x["path"], x["size"])
            if x["gb_per_s"] > best.get(key, {"gb_per_s": -1})["gb_per_s"]:
                best[key] = x
        for (path_, size), x in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(
                f"| {path_} | {size} | {x['batch']} | {x['msg_per_s'] / 1e6:.3f} | {x['gb_per_s']:.2f} | {x['mismatches']} |"
            )
    a = r.get("aio")
    if a:
        print(
            f"\n- asyncio: {a['concurrent']['awaits']:,} concurrent awaits in {a['concurrent']['seconds']:.3f} s, wrong "
            f"{a['concurrent']['wrong']}; 64 B round trip p50/p99 asyncio {a['rtt_asyncio']['p50_us']:.1f}/"
            f"{a['rtt_asyncio']['p99_us']:.1f} µs vs blocking {a['rtt_blocking']['p50_us']:.1f}/"
            f"{a['rtt_blocking']['p99_us']:.1f} µs; idle CPU: loop thread {a['idle_cpu']['loop_thread']:.2%}, poller "
            f"{a['idle_cpu']['poller_with_an_iterator_waiting']:.2%} (iterator waiting), "
            f"{a['idle_cpu']['poller_nothing_awaited']:.3%} (nothing awaited)"
        )
    s = r.get("single")
    if s:
        print(
            f"- per-message API, 64 B: enqueue {s['enqueue_msg_per_s']:,.0f} msg/s, enqueue + take interleaved "
            f"{s['interleaved_msg_per_s']:,.0f} msg/s, mismatches {s['mismatches']}"
        )
    for note in r.get("notes", []):
        print(f"- note: {note}")


def redis_table(path: Path) -> None:
    """The Track A / bridge / GpuQueue comparison of bench_redis.py, if it ran."""
    if not path.exists():
        print("\n- bench_redis: (missing)")
        return
    r = json.loads(path.read_text())
    e = r["env"]
    print(
        f"\n### Track A vs bridge vs GpuQueue (bench_redis.py): Redis {e['redis']}, {e['producers']} producer "
        f"processes, {e['messages']:,} messages per run, {e['cpus']} CPUs\n"
    )
    print(
        "| path | payload | frame | saturated msg/s | paced at msg/s | paced p50 µs | paced p99 µs | unloaded p50 µs "
        "| unloaded p99 µs | Redis µs/call: xadd, xreadgroup, evalsha |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for x in r["runs"]:
        lo, un, rc = x["paced"], x["unloaded"], x.get("redis_usec_per_call", {})
        calls = ", ".join(f"{rc[k]:g}" for k in ("xadd", "xreadgroup", "evalsha") if k in rc) or "–"
        print(
            f"| {x['label']} | {x['size']} B | {x['frame'] or '–'} | {x['msg_per_s']:,.0f} | {lo.get('msg_per_s', float('nan')):,.0f} "
            f"| {lo.get('p50_us', float('nan')):,.1f} "
            f"| {lo.get('p99_us', float('nan')):,.1f} | {un['p50_us']:,.1f} | {un['p99_us']:,.1f} | {calls} |"
        )


if __name__ == "__main__":
    main()
