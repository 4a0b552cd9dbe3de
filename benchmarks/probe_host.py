#!/usr/bin/env python3
"""What the CPython host costs the 64 B round trip (issue 11): one queue and its kernel, driven
up to five ways in interleaved rounds, one message at a time:

- ``python``: ``GpuQueue.enqueue``, a spin on the result's msg_id word,
  ``GpuQueue.try_dequeue_result`` (the Python methods, as bench_latency.py ran them before the
  compiled host path);
- ``compiled``: the same loop on ``q.enqueue`` and ``q.try_dequeue_result``, the queue's compiled
  host path (gpuq_driver/hostpath.c), where it could be built (``q.host_path``);
- ``inline``: the same stores from Python with the fewest operations (no call, no lock, no
  argument checks), a spin, then one slice copied out;
- ``ctypes``: one ctypes call per message into C (benchmarks/probe_host.c, built here with the
  system's C compiler) that makes the stores, spins and copies the result out, then the result
  as bytes;
- ``c``: the same loop wholly in C, called once per round: the floor of the host.

Each way covers two reads, the one read, and the one read with a scout, in a queue that never
leaves (``lease_ms=inf``: the inline and C hosts publish without telling the lease keeper).  Every
result is compared with its payload.  Prints a line per configuration and host; writes
probe_host.json and probe_host.png (matplotlib) to --out.

    PYTHONPATH=. python benchmarks/probe_host.py --out benchmarks/results/probe_host
    PYTHONPATH=. python benchmarks/probe_host.py --sim --iters 40   # the script's check on the CPU simulator

Builds probe_host.c with $CC (default ``cc``), or takes one built elsewhere (--lib); exits 2 where
there is neither, 1 if any result came back wrong.  Where the queue has no compiled host path
(no C compiler or no Python headers), the ``compiled`` host is left out, with a line saying why.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpuq_driver import GpuQueue, QueueConfig, hostpath  # noqa: E402
from gpuq_driver.layout import CHECK_LOW  # noqa: E402

CONFIGS = {"two reads": {}, "one read": {"one_read": True}, "one read + scout": {"one_read": True, "scouts": 1}}
HOSTS = ("python", "compiled", "inline", "ctypes", "c")


def build(folder: str, prebuilt: str | None = None) -> ctypes.CDLL:
    """probe_host.c as a shared library in ``folder`` (or ``prebuilt``, one built elsewhere:
    ``cc -O2 -shared -fPIC -o libprobe_host.so benchmarks/probe_host.c``); SystemExit(2) without a
    C compiler."""
    lib_path = prebuilt
    if lib_path is None:
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            raise SystemExit(f"no C compiler ({os.environ.get('CC', 'cc')}): set CC, or pass --lib; nothing measured")
        lib_path = os.path.join(folder, "libprobe_host.so")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib_path, str(HERE / "probe_host.c")], check=True)
    lib = ctypes.CDLL(os.path.abspath(lib_path))
    lib.probe_round_trips.restype = ctypes.c_int64
    lib.probe_round_trips.argtypes = (
        [ctypes.c_void_p] * 6
        + [ctypes.c_uint64] * 3
        + [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.c_uint32,
            ctypes.c_void_p,
        ]
    )
    lib.probe_crc32.restype = ctypes.c_uint32
    lib.probe_crc32.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32]
    for n in (0, 1, 5, 63, 64):  # its check must be the library's, or the C host's reads would all fail it
        data, seed = bytes(range(7, 7 + n)), (12345 + n) ^ n << 24
        if lib.probe_crc32(seed, data, n) != zlib.crc32(data, seed):
            raise SystemExit(f"probe_host.c's CRC-32 differs from zlib's at {n} bytes")
    lib.probe_call.restype = ctypes.c_int64
    lib.probe_call.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_void_p]
    return lib


def address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def settle(q: GpuQueue, head: int) -> None:
    """The queue's books after a round that bypassed them (callers hold both locks): every message
    below ``head`` enqueued, and its result taken."""
    q._head = q._tail = q._polled = head
    q._limit = head + q._cap


def python_round(q: GpuQueue, payloads: list, iters: int, tools) -> tuple:
    """The Python methods, whatever the queue has bound."""
    return api_round(q, payloads, iters, GpuQueue.enqueue.__get__(q), GpuQueue.try_dequeue_result.__get__(q))


def compiled_round(q: GpuQueue, payloads: list, iters: int, tools) -> tuple:
    """The queue's own calls: its compiled host path."""
    return api_round(q, payloads, iters, q.enqueue, q.try_dequeue_result)


def api_round(q: GpuQueue, payloads: list, iters: int, enqueue, take) -> tuple:
    ids, mask = q._res_hdr, q._mask
    clock = time.perf_counter_ns
    out = np.empty((iters, 2), np.int64)
    wrong = 0
    for i in range(iters):
        p = payloads[i & 15]
        t = clock()
        mid = enqueue(p)
        idx = ((mid & mask) << 1) | 1
        while ids[idx] != mid:
            pass
        t1 = clock()
        r = take(mid)
        t2 = clock()
        wrong += r != p
        out[i] = (t1 - t, t2 - t)
    return out, wrong


def inline_round(q: GpuQueue, payloads: list, iters: int, tools) -> tuple:
    """GpuQueue.enqueue's stores with the fewest Python operations (what trimming the API could at
    most give), then the result's bytes copied out."""
    crc32 = zlib.crc32
    clock = time.perf_counter_ns
    out = np.empty((iters, 2), np.int64)
    wrong = 0
    req_data, req_hdr, h32, doorbell, front = q._req_data, q._req_hdr, q._req_hdr32, q._doorbell, q._front
    ids, res_data, mask, sb, one_read, ready = q._res_hdr, q._res_data, q._mask, q._sb, q._one_read, q._ready
    with q._plock, q._clock:
        head = q._head
        for i in range(iters):
            p = payloads[i & 15]
            n = len(p)
            t = clock()
            seq = head
            slot = seq & mask
            off = slot * sb
            req_data[off : off + n] = p
            s2 = slot << 1
            if one_read and n <= 64 and seq - front[0] < 2:
                h32[s2 << 1] = n
                h32[(s2 << 1) | 1] = (crc32(p, seq ^ n << 24) | 0xFF) ^ CHECK_LOW
            else:
                req_hdr[s2] = n | ready
            req_hdr[s2 | 1] = seq
            head = seq + 1
            doorbell[0] = head
            while ids[s2 | 1] != seq:
                pass
            t1 = clock()
            r = res_data[off : off + (ids[s2] & 0xFFFFFFFF)].tobytes()
            t2 = clock()
            wrong += r != p
            out[i] = (t1 - t, t2 - t)
        settle(q, head)
    return out, wrong


def c_round(q: GpuQueue, payloads: list, iters: int, tools) -> tuple:
    n = len(payloads[0])
    flat = ctypes.create_string_buffer(b"".join(payloads), 16 * n)
    out = np.empty((iters, 2), np.int64)
    with q._plock, q._clock:
        head = q._head
        views = (q._req_data, q._req_hdr, q._res_hdr, q._res_data, q._doorbell, q._front)
        args = [address(v) for v in views] + [head, q._mask, q._sb, flat, n, iters, int(q._one_read), CHECK_LOW]
        wrong = tools.lib.probe_round_trips(*args, out.ctypes.data)
        if wrong < 0:
            raise RuntimeError(f"round trip {-1 - wrong} of the C host saw no result within 2 s")
        settle(q, head + iters)
    return out, int(wrong)


class ProbeQueue(ctypes.Structure):
    """probe_host.c's probe_queue."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("req_data", "req_hdr", "res_hdr", "res_data", "doorbell", "front")]
    _fields_ += [("head", ctypes.c_uint64), ("mask", ctypes.c_uint64), ("slot_bytes", ctypes.c_uint64)]
    _fields_ += [("one_read", ctypes.c_int32), ("check_low", ctypes.c_uint32)]


def ctypes_round(q: GpuQueue, payloads: list, iters: int, tools) -> tuple:
    """One ctypes call per round trip (probe_call: the stores, the spin and the copy in C), then the
    result as bytes: what a compiled helper called from Python per message would reach."""
    clock = time.perf_counter_ns
    out = np.empty((iters, 2), np.int64)
    wrong = 0
    buf = ctypes.create_string_buffer(max(64, q._sb))
    view = memoryview(buf).cast("B")
    call = tools.lib.probe_call
    with q._plock, q._clock:
        views = (q._req_data, q._req_hdr, q._res_hdr, q._res_data, q._doorbell, q._front)
        st = ProbeQueue(*[address(v) for v in views], q._head, q._mask, q._sb, int(q._one_read), CHECK_LOW)
        ref = ctypes.byref(st)
        for i in range(iters):
            p = payloads[i & 15]
            t = clock()
            n = call(ref, p, len(p), buf)
            t1 = clock()
            r = view[:n].tobytes()
            t2 = clock()
            if n < 0:
                raise RuntimeError(f"round trip {i} of the ctypes host saw no result within 2 s")
            wrong += r != p
            out[i] = (t1 - t, t2 - t)
        settle(q, st.head)
    return out, wrong


ROUNDS = {
    "python": python_round,
    "compiled": compiled_round,
    "inline": inline_round,
    "ctypes": ctypes_round,
    "c": c_round,
}


def measure(tools, hosts: tuple, size: int, iters: int, rounds: int, backend: str) -> dict:
    """{configuration: {host: figures}}; prints a line per configuration and host."""
    payloads = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes() for i in range(16)]
    results = {}
    for name, cfg in CONFIGS.items():
        qcfg = QueueConfig(
            capacity=1024,
            slot_bytes=max(64, size),
            lease_ms=float("inf"),
            linger_ms=float("inf"),
            backend=backend,
            **cfg,
        )
        samples = {h: [] for h in hosts}
        wrong = dict.fromkeys(hosts, 0)
        with GpuQueue(qcfg) as q:
            for host in hosts:  # warm-up
                ROUNDS[host](q, payloads, max(1, iters // 4), tools)
            for _ in range(rounds):
                for host in hosts:
                    a, w = ROUNDS[host](q, payloads, iters, tools)
                    samples[host].append(a)
                    wrong[host] += w
            q.shutdown()
            stats = q.stats()
        row = {}
        for host in hosts:
            a = np.concatenate(samples[host]) / 1e3
            p50, p99 = np.percentile(a, 50, axis=0), np.percentile(a, 99, axis=0)
            row[host] = {
                "readable_p50_us": float(p50[0]),
                "readable_p99_us": float(p99[0]),
                "taken_p50_us": float(p50[1]),
                "taken_p99_us": float(p99[1]),
                "rounds_readable_p50_us": [round(float(np.median(r[:, 0])) / 1e3, 3) for r in samples[host]],
                "n": int(a.shape[0]),
                "wrong": int(wrong[host]),
            }
            print(
                f"{name:17s} {host:6s} readable p50 {p50[0]:.2f} p99 {p99[0]:.2f} us | taken p50 {p50[1]:.2f} "
                f"p99 {p99[1]:.2f} us | wrong {wrong[host]} | rounds' p50 {row[host]['rounds_readable_p50_us']}",
                flush=True,
            )
        row["processed"] = stats.processed
        row["spec_reads"], row["spec_retries"] = stats.spec_reads, stats.spec_retries
        results[name] = row
    return results


def plot(results: dict, hosts: tuple, path: Path) -> None:
    from plotting import pyplot

    plt = pyplot(f" ({path.name})")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    x = np.arange(len(results))
    for ax, key in zip(axes, ("readable_p50_us", "taken_p50_us")):
        width = 0.8 / len(hosts)
        for k, host in enumerate(hosts):
            ax.bar(x + (k - (len(hosts) - 1) / 2) * width, [results[c][host][key] for c in results], width, label=host)
        ax.set_xticks(x, list(results))
        ax.set_title(f"64 B round trip, {key.split('_')[0]} p50")
        ax.axhline(4.0 if key.startswith("readable") else 4.8, color="k", lw=0.8, ls="--", label="issue 11's target")
    axes[0].set_ylabel("µs")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=3000, help="round trips per host per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--size", type=int, default=64, help="payload bytes")
    ap.add_argument("--sim", action="store_true", help="the CPU simulator (the script's check, no GPU)")
    ap.add_argument("--out", default=None, help="folder for probe_host.json and probe_host.png")
    ap.add_argument("--lib", default=None, help="probe_host.c built elsewhere (where this machine has no C compiler)")
    args = ap.parse_args()
    backend = "sim" if args.sim else "cuda"
    with tempfile.TemporaryDirectory() as folder:
        tools = types.SimpleNamespace(lib=build(folder, args.lib))
        compiled = hostpath.status()
        if compiled != "compiled":
            print(f"no compiled host path ({compiled}): the compiled host not measured")
        hosts = tuple(h for h in HOSTS if h != "compiled" or compiled == "compiled")
        results = measure(tools, hosts, args.size, args.iters, args.rounds, backend)
    wrong = sum(row[h]["wrong"] for row in results.values() for h in hosts)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        device = "the CPU simulator" if args.sim else None
        if device is None:
            from gpuq_driver import device_info

            device = str(device_info(0))
        doc = {"device": device, "size": args.size, "iters": args.iters, "rounds": args.rounds, "hosts": hosts}
        doc["results"] = results
        (out / "probe_host.json").write_text(json.dumps(doc, indent=1))
        plot(results, hosts, out / "probe_host.png")
    print(f"wrong results: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
