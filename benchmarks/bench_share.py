#!/usr/bin/env python3
"""Sharing the GPU: how long other CUDA work in the process waits beside a queue.

In one run, each in a child process with a time bound (tests/neighbour_child.py):
  calls       for cuda-python, PyTorch and CuPy, every call of docs/design.md's table ("what you may
              do while a queue runs"), with no queue at all, beside an idle queue (parked), and
              beside a queue under continuous traffic (a producer and a consumer thread, 64 B);
  sync waits  300 torch.cuda.synchronize() calls after a small op, under traffic (a producer paced
              at 200,000 msg/s), for several lease lengths: the distribution of the wait (p50 / p99 /
              max, ms) and the queue's msg/s meanwhile.  The traffic threads are Python threads in
              the same process, so the wait includes getting the GIL back after the sync: these
              runs set CPython's switch interval to 0.2 ms (sys.setswitchinterval) to show the
              GPU's part; two more runs keep the default 5 ms, with the producer paced and flat out.
Writes <out>/bench_share.json and <out>/bench_share.png and prints both tables.

    PYTHONPATH=. python benchmarks/bench_share.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from plotting import pyplot  # benchmarks/plotting.py

CHILD = Path(__file__).resolve().parent.parent / "tests" / "neighbour_child.py"


def child(*args: str, timeout: float = 180) -> list[dict]:
    try:
        r = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return [json.loads(x) for x in out.splitlines() if x.startswith("{")] + [{"hang": timeout}]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode:
        lines.append({"error": r.stderr[-1500:]})
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--leases", default="0.5,1,2", help="lease_ms values for the sync-wait runs")
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    libs = ["driver"] + [lib for lib in ("torch", "cupy") if importlib.util.find_spec(lib)]
    res: dict = {"calls": {}, "sync": {}}
    for lib in libs:
        for state in ("none", "idle", "busy"):
            lines = child(lib, state)
            res["calls"][f"{lib}/{state}"] = lines
            print(
                f"  {lib}/{state}: {[(x['call'], round(x['ms'], 2)) for x in lines if 'call' in x]}"
                f" {[x for x in lines if 'summary' in x or 'hang' in x or 'error' in x]}",
                flush=True,
            )
    if "torch" in libs:
        runs = [(float(x), 200_000, 0.2) for x in args.leases.split(",")] + [(1.0, 200_000, 5.0), (1.0, 0, 5.0)]
        for lease, rate, switch in runs:
            lines = child(
                "torch",
                "busy",
                "--lease-ms",
                str(lease),
                "--sync-samples",
                str(args.samples),
                "--rate",
                str(rate),
                "--switch-interval-ms",
                str(switch),
            )
            key = f"{lease} ms, " + (f"paced {rate:,} msg/s" if rate else "flat out") + f", GIL switch {switch} ms"
            waits = next((x["sync_ms"] for x in lines if "sync_ms" in x), [])
            summary = next((x["summary"] for x in lines if "summary" in x), {})
            a = np.asarray(waits) if waits else np.zeros(1)
            res["sync"][key] = {
                "waits_ms": waits,
                "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99)),
                "max_ms": float(a.max()),
                "summary": summary,
                "problems": [x for x in lines if "hang" in x or "error" in x],
            }
            print(
                f"  sync under traffic, lease {key}: p50 {res['sync'][key]['p50_ms']:.2f} ms, "
                f"p99 {res['sync'][key]['p99_ms']:.2f} ms, max {a.max():.2f} ms; {summary}",
                flush=True,
            )
    (out / "bench_share.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "bench_share.png")

    print("\n| call | no queue ms | queue idle ms | queue busy ms |\n|---|---:|---:|---:|")
    for lib in libs:
        rows: dict[str, dict[str, float]] = {}
        for state in ("none", "idle", "busy"):
            for x in res["calls"][f"{lib}/{state}"]:
                if "call" in x:
                    rows.setdefault(x["call"], {})[state] = x["ms"]
        for call, t in rows.items():
            print(
                f"| {call} | "
                + " | ".join(f"{t[s]:,.1f}" if s in t else "hang/error" for s in ("none", "idle", "busy"))
                + " |"
            )
    for lib in libs:
        busy = next((x["summary"] for x in res["calls"][f"{lib}/busy"] if "summary" in x), {})
        print(f"traffic beside {lib}: {busy}")
    if res["sync"]:
        print(
            "\n| lease, producer | torch.cuda.synchronize under traffic p50 ms | p99 ms | max ms | queue msg/s | lost | wrong |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for lease, v in res["sync"].items():
            s = v["summary"]
            print(
                f"| {lease} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['max_ms']:.2f} | "
                f"{s.get('msg_per_s', 0):,.0f} | {s.get('lost')} | {s.get('wrong')} |"
            )
    return 0


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for lease, v in res["sync"].items():
        w = np.sort(v["waits_ms"])
        if w.size:
            ax.plot(w, np.arange(1, w.size + 1) / w.size, label=f"lease {lease} (p99 {v['p99_ms']:.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("torch.cuda.synchronize() wait under queue traffic, ms")
    ax.set_ylabel("fraction of calls")
    ax.set_title("gpuq_driver: a synchronise beside a busy queue")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
