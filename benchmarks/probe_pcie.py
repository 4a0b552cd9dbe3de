#!/usr/bin/env python3
"""What limits 4 KB messages to ~36 GB/s each way when SMs read host-mapped pinned memory and write
results to host-mapped pinned memory at once, and would the copy engine help?  (PCIe diagnostic.)

--mib MiB (default 256) of --row-byte rows (default 4096) move each way; every case runs once as a
warm-up, then --reps times; GB/s (1e9 bytes/s) best and median, per direction:
  sm_read / sm_read_ldcv   kernel: mapped pinned host -> VRAM (plain loads / __ldcv, as the queue)
  sm_write                 kernel: VRAM -> mapped pinned host (plain uint4 stores)
  sm_read_write            one kernel: mapped host -> another mapped host buffer (__ldcv, the
                           queue's echo); the same bytes each way
  ce_h2d / ce_d2h          cuMemcpyHtoDAsync / cuMemcpyDtoHAsync, one copy of all the rows
  ce_h2d_plus_sm_write     CE H2D on stream A and the sm_write kernel on stream B, issued together
  ce_h2d_plus_ce_d2h       both copies together on two streams
Kernels (device_src/gpuq_pcie_probe.cu): a warp per row in a grid-stride loop over rows, 4 uint4
loads in flight per lane, --blocks (default: SM count) x each of --threads (default 64,256,1024).
Times are cuEvent durations of each operation on its own stream ("own"); the two-operation cases
also give bytes / wall time with both to completion (the table's main figures for those).
Every case's destination is zeroed first and compared byte for byte after its last rep: ok/MISMATCH.
Prints one line per case and writes <--out>/probe_pcie.json; exits 1 if any case is a MISMATCH.

    PYTHONPATH=. python3 benchmarks/probe_pcie.py --out /tmp/o
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import compile_cubin, driver  # noqa: E402
from gpuq_driver.compiler import CompileOptions, nvrtc_version  # noqa: E402
from gpuq_driver.errors import check  # noqa: E402


class Probe:
    """The buffers, streams and kernels every case shares."""

    def __init__(self, args):
        self.ctx = driver.primary_context(0)
        self.info = driver.device_info(0)
        self.d = driver._driver()
        self.row, self.rows = args.row, (args.mib << 20) // args.row
        self.total = self.rows * self.row
        self.blocks = args.blocks or self.info.sm_count
        mod = driver.Module(self.ctx, compile_cubin("gpuq_pcie_probe.cu", CompileOptions(arch=self.info.arch)))
        self.fn = {"plain": mod.function("probe_copy"), "ldcv": mod.function("probe_copy_ldcv")}
        self.modules = [mod]
        self.sa, self.sb = driver.Stream(self.ctx), driver.Stream(self.ctx)
        rng = np.random.default_rng(7)
        self.ref_a = np.frombuffer(rng.bytes(self.total), np.uint8)  # the host source's bytes
        self.ref_b = np.frombuffer(rng.bytes(self.total), np.uint8)  # the VRAM source's bytes
        self.hin = driver.MappedHostBuffer(self.ctx, self.total)
        self.hout = driver.MappedHostBuffer(self.ctx, self.total)
        self.hin_np = np.frombuffer(self.hin.view, np.uint8)
        self.hout_np = np.frombuffer(self.hout.view, np.uint8)
        self.dev_a = driver.DeviceBuffer(self.ctx, self.total)  # destination of reads / H2D
        self.dev_b = driver.DeviceBuffer(self.ctx, self.total)  # source of writes / D2H
        self.hin_np[:] = self.ref_a
        self.hout_np[:] = self.ref_b  # staged through pinned memory into dev_b, then cleared
        driver.copy_htod_async(self.dev_b.ptr, self.hout.host_ptr, self.total, self.sa)
        self.sa.synchronize()
        self.hout_np[:] = 0
        self.back = np.empty(self.total, np.uint8)
        self.events = [check(self.d.cuEventCreate(0), "cuEventCreate") for _ in range(4)]  # timing events

    def close(self) -> None:
        for ev in self.events:
            check(self.d.cuEventDestroy(ev), "cuEventDestroy")
        for r in (self.hin, self.hout, self.dev_a, self.dev_b, self.sa, self.sb, *self.modules):
            r.close()

    # -- the operations: each enqueues its work on a stream --------------------------------------
    def kernel(self, kind: str, src: int, dst: int, threads: int, stream):
        args = driver.LaunchArgs(
            [ctypes.c_uint64(src), ctypes.c_uint64(dst), ctypes.c_uint64(self.rows), ctypes.c_uint32(self.row // 16)]
        )
        return lambda: driver.launch(self.fn[kind], self.blocks, threads, args, stream)

    def ce_h2d(self, stream):
        return lambda: driver.copy_htod_async(self.dev_a.ptr, self.hin.host_ptr, self.total, stream)

    def ce_d2h(self, stream):
        return lambda: driver.copy_dtoh_async(self.hout.host_ptr, self.dev_b.ptr, self.total, stream)

    # -- destinations: zero before a case, compare after ------------------------------------------
    def clear(self, dest: str) -> None:
        if dest == "hout":
            self.hout_np[:] = 0
        else:
            driver.memset_async(self.dev_a.ptr, 0, self.total, self.sa)
            self.sa.synchronize()

    def bad_rows(self, dest: str, ref: np.ndarray) -> int:
        if dest == "hout":
            got = self.hout_np
        else:
            driver.copy_dtoh_async(self.back.ctypes.data, self.dev_a.ptr, self.total, self.sa)
            self.sa.synchronize()
            got = self.back
        if np.array_equal(got, ref):
            return 0
        return int((got.reshape(self.rows, self.row) != ref.reshape(self.rows, self.row)).any(axis=1).sum())

    def run(self, ops, checks, reps: int) -> dict:
        """``ops``: [(direction, stream, enqueue)]; one warm-up then ``reps`` timed runs of all of
        them issued together.  ``checks``: [(destination, expected bytes)]."""
        for dest, _ in checks:
            self.clear(dest)
        wall, own = [], {name: [] for name, _, _ in ops}
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            for i, (_, stream, enqueue) in enumerate(ops):
                check(self.d.cuEventRecord(self.events[2 * i], stream.handle), "cuEventRecord")
                enqueue()
                check(self.d.cuEventRecord(self.events[2 * i + 1], stream.handle), "cuEventRecord")
            for _, stream, _ in ops:
                stream.synchronize()
            dt = time.perf_counter() - t0
            if rep == 0:
                continue  # warm-up
            wall.append(dt)
            for i, (name, _, _) in enumerate(ops):
                ms = check(self.d.cuEventElapsedTime(self.events[2 * i], self.events[2 * i + 1]), "cuEventElapsedTime")
                own[name].append(float(ms) / 1e3)
        bad = sum(self.bad_rows(dest, ref) for dest, ref in checks)

        def rate(secs: list[float]) -> dict:
            return {"best": self.total / min(secs) / 1e9, "median": self.total / float(np.median(secs)) / 1e9}

        out = {"check": "ok" if bad == 0 else "MISMATCH", "bad_rows": bad, "wall_s": wall}
        for name, secs in own.items():
            out[name] = {"own_gbps": rate(secs), "own_s": secs}
            if len(ops) > 1:
                out[name]["wall_gbps"] = rate(wall)
        return out


def fmt(res: dict) -> str:
    parts = []
    for way in ("h2d", "d2h"):
        if way in res:
            r = res[way]
            main = r.get("wall_gbps", r["own_gbps"])
            s = f"{way} {main['best']:6.1f} {main['median']:6.1f}"
            if "wall_gbps" in r:
                s += f" (own {r['own_gbps']['best']:5.1f} {r['own_gbps']['median']:5.1f})"
            parts.append(f"{s:34s}")
    return " ".join(parts) + f" {res['check']}" + (f" ({res['bad_rows']} bad rows)" if res["bad_rows"] else "")


def main() -> int:
    ap = argparse.ArgumentParser(
        description="PCIe bandwidth: SM loads/stores to mapped pinned memory vs the copy engine"
    )
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mib", type=int, default=256, help="MiB moved each way per run")
    ap.add_argument("--row", type=int, default=4096, help="row (message) bytes, a multiple of 16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=0, help="grid size (default: the SM count)")
    ap.add_argument("--threads", default="64,256,1024", help="comma list of threads per block (multiples of 32)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.row <= 0 or args.row % 16 or (args.mib << 20) < args.row or args.reps < 1 or args.blocks < 0:
        ap.error("--row must be a positive multiple of 16 no larger than --mib MiB; --reps >= 1; --blocks >= 0")
    if not threads or any(t <= 0 or t > 1024 or t % 32 for t in threads):
        ap.error("--threads: multiples of 32 in 32 .. 1024")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    p = Probe(args)
    env = {
        "device": p.info.name,
        "arch": p.info.arch,
        "sm_count": p.info.sm_count,
        "driver": driver.driver_version(),
        "cuda_bindings": version("cuda-bindings"),
        "nvrtc": "{}.{}".format(*nvrtc_version()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(
        f"{env['device']} ({env['arch']}, {env['sm_count']} SMs), driver {env['driver']}; {p.rows} rows x {p.row} B "
        f"= {p.total / 2**20:.0f} MiB each way, blocks {p.blocks}, reps {args.reps} after 1 warm-up",
        flush=True,
    )
    print(f"{'case':22s} {'threads':>7s}  GB/s best median per direction (two ops: wall-based, own = events)")
    hin, hout, dev_a, dev_b = p.hin.device_ptr, p.hout.device_ptr, p.dev_a.ptr, p.dev_b.ptr
    a, b = p.ref_a, p.ref_b
    cases = []
    for t in threads:
        kernel_cases = {
            "sm_read": ([("h2d", p.sa, p.kernel("plain", hin, dev_a, t, p.sa))], [("dev_a", a)]),
            "sm_read_ldcv": ([("h2d", p.sa, p.kernel("ldcv", hin, dev_a, t, p.sa))], [("dev_a", a)]),
            "sm_write": ([("d2h", p.sa, p.kernel("plain", dev_b, hout, t, p.sa))], [("hout", b)]),
            "sm_read_write": ([("h2d", p.sa, p.kernel("ldcv", hin, hout, t, p.sa))], [("hout", a)]),
            "ce_h2d_plus_sm_write": (
                [("h2d", p.sa, p.ce_h2d(p.sa)), ("d2h", p.sb, p.kernel("plain", dev_b, hout, t, p.sb))],
                [("dev_a", a), ("hout", b)],
            ),
        }
        for name, (ops, checks) in kernel_cases.items():
            res = p.run(ops, checks, args.reps)
            if name == "sm_read_write":  # one kernel: the same bytes and time each way
                res["d2h"] = res["h2d"]
            cases.append({"case": name, "threads": t, "blocks": p.blocks, **res})
            print(f"{name:22s} {t:7d}  {fmt(res)}", flush=True)
    ce_cases = {
        "ce_h2d": ([("h2d", p.sa, p.ce_h2d(p.sa))], [("dev_a", a)]),
        "ce_d2h": ([("d2h", p.sa, p.ce_d2h(p.sa))], [("hout", b)]),
        "ce_h2d_plus_ce_d2h": (
            [("h2d", p.sa, p.ce_h2d(p.sa)), ("d2h", p.sb, p.ce_d2h(p.sb))],
            [("dev_a", a), ("hout", b)],
        ),
    }
    for name, (ops, checks) in ce_cases.items():
        res = p.run(ops, checks, args.reps)
        cases.append({"case": name, "threads": None, "blocks": None, **res})
        print(f"{name:22s} {'-':>7s}  {fmt(res)}", flush=True)
    p.close()

    result = {"env": env, "args": vars(args), "rows": p.rows, "row_bytes": p.row, "total_bytes": p.total}
    result["cases"] = cases
    (out_dir / "probe_pcie.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'probe_pcie.json'}")
    return 0 if all(c["check"] == "ok" for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
