#!/usr/bin/env python3
"""The host side of one message, step by step (issue 11): what ``enqueue`` and
``try_dequeue_result`` spend on a 64 B message, each step timed alone on the queue's own objects
(its mapped memory, lock, lease counters), beside the two calls timed whole.

Each step is a statement copied from gpuq_driver/queue.py, run in a loop with ``timeit`` (best of
``--repeat``, the empty loop subtracted).  A step runs on one slot, so its lines stay in the CPU's
cache; the whole calls go round a ring of ``--capacity`` slots, the kernel serving the messages
as they come (enqueue) or on results already done (take), so their lines are cold and the GPU
reads them as in a real run: the difference is what the memory costs.  The whole calls are the
Python methods, then, where the queue has it, its compiled host path (gpuq_driver/hostpath.c).
Prints a table; writes host_steps.json and host_steps.png to --out.

    PYTHONPATH=. python benchmarks/host_steps.py            # on the GPU (mapped pinned memory)
    PYTHONPATH=. python benchmarks/host_steps.py --sim      # on the CPU simulator (its own memory)

Exits 1 if a result taken in the whole-call run is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import timeit
from pathlib import Path
from zlib import crc32

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plotting import pyplot  # noqa: E402

from gpuq_driver import GpuQueue, QueueConfig, device_info  # noqa: E402
from gpuq_driver.layout import CHECK_LOW  # noqa: E402

# (name, statement): enqueue's steps in its order (queue.py, GpuQueue.enqueue)
ENQUEUE_STEPS = [
    ("checks: timeout, type, size", "timeout is not None; type(p) is not bytes; n = len(p); n > sb"),
    ("producer lock", "with plock: pass"),
    ("slot and offset", "seq = q._head; seq >= q._limit; slot = seq & q._mask; off = slot * q._sb"),
    ("payload copy (64 B)", "data[off : off + n] = p"),
    ("slot check (one_read)", "f = (crc32(p, seq ^ n << 24) | 0xFF) ^ CHECK_LOW"),
    ("header: 3 stores", "h32[slot2 << 1] = n; h32[slot2 << 1 | 1] = f; hdr[slot2 | 1] = seq"),
    ("doorbell store", "db[0] = seq"),
    ("lease look", "begun[0] == leases.launches"),
]
# try_dequeue_result's steps (queue.py)
TAKE_STEPS = [
    ("msg_id check, slot", "type(m) is not int; slot = m & mask"),
    ("consumer lock", "with clock: pass"),
    ("header: 2 loads", "rh[(slot << 1) | 1] != m; lf = rh[slot << 1]"),
    ("result copy out (64 B)", "res[off : off + (lf & 0xFFFFFFFF)].tobytes()"),
    ("tail bookkeeping", "t = q._tail; q._tail = t; q._accepting and 1; q._cap + t"),
    ("flags check", "(lf >> 32) != DONE"),
]


def time_steps(steps: list, ns: dict, number: int, repeat: int) -> dict:
    """ns per run of each statement (best of ``repeat`` loops of ``number``), the empty loop
    subtracted."""
    empty = min(timeit.repeat("pass", number=number, repeat=repeat)) / number
    out = {}
    for name, stmt in steps:
        best = min(timeit.repeat(stmt, globals=ns, number=number, repeat=repeat)) / number
        out[name] = max(0.0, (best - empty) * 1e9)
    return out


def whole_calls(q: GpuQueue, n: int, repeat: int, enq, take) -> tuple[dict, int]:
    """ns per enqueue (the kernel serving them as they come) and per try_dequeue_result (on
    results already done), best of ``repeat`` rounds of n messages each; and the wrong results.
    ``enq``, ``take``: the calls timed (the Python methods, or the queue's compiled ones)."""
    payloads = [bytes([i % 251]) * 64 for i in range(256)]
    best_e = best_t = float("inf")
    bad = 0
    for _ in range(repeat):
        first = q._head
        t0 = time.perf_counter()
        for i in range(n):
            enq(payloads[i & 255])
        best_e = min(best_e, (time.perf_counter() - t0) / n)
        last = first + n - 1
        deadline = time.monotonic() + 30
        while q._res_hdr[((last & q._mask) << 1) | 1] != last:
            if time.monotonic() > deadline:
                raise RuntimeError("the results did not come back within 30 s")
            time.sleep(1e-3)
        got = []
        t0 = time.perf_counter()
        for m in range(first, first + n):
            got.append(take(m))
        best_t = min(best_t, (time.perf_counter() - t0) / n)
        bad += sum(r != payloads[(m - first) & 255] for m, r in zip(range(first, first + n), got))
    return {"enqueue call": best_e * 1e9, "try_dequeue_result call": best_t * 1e9}, bad


def steps_sum(steps: dict) -> float:
    """The steps' sum, without the "(mapped)" re-measurements of steps already counted."""
    return sum(v for k, v in steps.items() if "(mapped)" not in k)


def plot(res: dict, path: Path) -> None:
    plt = pyplot(f" ({path.name})")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, steps, call) in zip(
        axes,
        (
            ("enqueue, 64 B", res["enqueue_steps_ns"], "enqueue call"),
            ("try_dequeue_result, 64 B", res["take_steps_ns"], "try_dequeue_result call"),
        ),
    ):
        names = [*steps, "sum of the steps", f"{call} (ring, cold lines)"]
        vals = [*steps.values(), steps_sum(steps), res["calls_ns"][call]]
        ax.barh(names[::-1], vals[::-1], color=["tab:gray", "tab:orange", *["tab:blue"] * len(steps)])
        ax.set_xlabel("ns")
        ax.set_title(title)
    fig.suptitle(f"host steps per message on {res['env']['device']} (Python {res['env']['python']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description="enqueue and try_dequeue_result, step by step")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sim", action="store_true", help="on the CPU simulator (no GPU)")
    ap.add_argument("--number", type=int, default=200_000, help="runs of each step per loop")
    ap.add_argument("--repeat", type=int, default=5, help="loops per step; the best counts")
    ap.add_argument("--messages", type=int, default=100_000, help="messages per whole-call round")
    ap.add_argument("--capacity", type=int, default=1 << 18)
    args = ap.parse_args()
    if args.messages > args.capacity:
        ap.error("--messages must be at most --capacity (the whole-call rounds fill the ring once)")
    cfg = QueueConfig(
        capacity=args.capacity, slot_bytes=64, one_read=True, backend="sim" if args.sim else "cuda", lease_ms=1.0
    )
    t_end = time.perf_counter() + 1.0  # the host's clock ramps up under load
    while time.perf_counter() < t_end:
        pass
    with GpuQueue(cfg) as q:
        p = bytes(64)
        q.enqueue(p)
        q.wait_result(0, timeout=10)
        slot = q._head & q._mask
        ns = {
            "q": q,
            "p": p,
            "timeout": None,
            "sb": q._sb,
            "n": 64,
            "plock": q._plock,
            "clock": q._clock,
            "data": q._req_data,
            "off": slot * q._sb,
            "crc32": crc32,
            "CHECK_LOW": CHECK_LOW,
            "seq": q._head,
            "slot": slot,
            "slot2": 0,
            "hdr": memoryview(bytearray(16)).cast("Q"),  # a scratch header (the mapped one: below)
            "h32": memoryview(bytearray(16)).cast("I"),
            "db": memoryview(bytearray(8)).cast("Q"),  # a scratch doorbell
            "f": 0,
            "begun": q._begun,
            "leases": q._leases,
            "m": 0,
            "mask": q._mask,
            "rh": q._res_hdr,
            "res": q._res_data,
            "lf": 64,
            "DONE": 0,
        }
        q.pause()  # no GPU traffic (or simulator thread) beside the steps
        enq_steps = time_steps(ENQUEUE_STEPS, ns, args.number, args.repeat)
        # the header and doorbell stores once more, into the live mapped memory: the header of a
        # message already served gets its own words again, the doorbell its value
        done = q._head - 1
        slot2 = (done & q._mask) << 1
        live = {"hdr": q._req_hdr, "h32": q._req_hdr32, "db": q._doorbell, "slot2": slot2, "seq": done}
        live["n"], live["f"] = q._req_hdr32[slot2 << 1], q._req_hdr32[slot2 << 1 | 1]
        mapped = [
            ("header: 3 stores (mapped)", "h32[slot2 << 1] = n; h32[slot2 << 1 | 1] = f; hdr[slot2 | 1] = seq"),
            ("doorbell store (mapped)", "db[0] = db[0]"),
        ]
        enq_steps.update(time_steps(mapped, live, args.number, args.repeat))
        take_steps = time_steps(TAKE_STEPS, ns, args.number, args.repeat)
        q.resume()
        python = GpuQueue.enqueue.__get__(q), GpuQueue.try_dequeue_result.__get__(q)
        calls, bad = whole_calls(q, args.messages, max(2, args.repeat // 2), *python)
        if q.host_path == "compiled":  # the queue's own calls: its compiled host path (hostpath.py)
            more, bad2 = whole_calls(q, args.messages, max(2, args.repeat // 2), q.enqueue, q.try_dequeue_result)
            calls.update({f"{k} (compiled)": v for k, v in more.items()})
            bad += bad2
        env = {
            "device": "CPU simulator" if args.sim else device_info(cfg.device).name,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python_empty_loop_ns": round(min(timeit.repeat("pass", number=1_000_000, repeat=3)) * 1e3, 1),
        }
    res = {
        "env": env,
        "enqueue_steps_ns": enq_steps,
        "take_steps_ns": take_steps,
        "calls_ns": calls,
        "wrong": int(bad),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_steps.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "host_steps.png")
    print(f"{env['device']}, Python {env['python']}, empty loop {env['python_empty_loop_ns']} ns")
    for title, steps, call in (
        ("enqueue (64 B, one_read=True)", enq_steps, "enqueue call"),
        ("try_dequeue_result (64 B)", take_steps, "try_dequeue_result call"),
    ):
        print(f"{title}:")
        for name, v in steps.items():
            print(f"  {name:34s} {v:7.0f} ns")
        print(f"  {'sum of the steps':34s} {steps_sum(steps):7.0f} ns")
        print(f"  {call + ' (ring of ' + str(args.capacity) + ')':34s} {calls[call]:7.0f} ns")
        if f"{call} (compiled)" in calls:
            print(f"  {call + ', compiled host path':34s} {calls[call + ' (compiled)']:7.0f} ns")
    print(f"wrong results: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
