#!/usr/bin/env python3
"""Do two warps polling host memory at once slow each other's polls, and does it matter whether
they poll the same 64 B line or different ones?  (Issue 11: a scout's polls of the front's lines
took 3,549-3,628 SM cycles instead of 2,846, seventh session; a scout polling a copy of the slot in
another line would be worth it only if different lines do not slow each other.)

Standalone (cuda-python and numpy only, as probe_lines.py).  One block; each warp reads one 64 B
line of mapped pinned memory (lanes 0-7, 8 bytes each, volatile) back to back, POLLS times, and
sums each poll's round trip in SM cycles (clock64) and ns (%globaltimer).  Cases: one warp; two
warps on the same line; two warps on two lines of one 128 B pair; two warps on lines 4 KB apart.
Each case runs with the host idle and with the host storing into the polled lines in a loop (as a
producer would).  Prints one line per case; writes nothing.

    python3 benchmarks/probe_twopoll.py [POLLS]
"""

import ctypes
import sys

import numpy as np
from cuda.bindings import driver as cu
from probe_lines import ck, probe_function  # the same standalone set-up (cuda-python and numpy only)

SRC = rb"""
extern "C" __global__ void probe(const volatile unsigned long long* base, const int* line_of_warp,
                                 unsigned long long polls, unsigned long long* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const volatile unsigned long long* line = base + 8 * line_of_warp[warp];
  unsigned long long cyc = 0, ns = 0, sink = 0;
  for (unsigned long long i = 0; i < polls; ++i) {
    unsigned long long t0 = clock64(), g0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
    unsigned long long v = lane < 8 ? line[lane] : 0;
    v = __shfl_sync(0xffffffffu, v, 7) + __shfl_sync(0xffffffffu, v, 0);  // wait for the read
    sink += v;
    unsigned long long g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    cyc += clock64() - t0;
    ns += g1 - g0;
  }
  if (lane == 0) { out[3 * warp] = cyc; out[3 * warp + 1] = ns; out[3 * warp + 2] = sink; }
}
"""


def main():
    polls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    fn, st = probe_function(SRC)
    size = 16384
    host = ck(cu.cuMemHostAlloc(size, cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE))
    mem = np.ctypeslib.as_array((ctypes.c_uint64 * (size // 8)).from_address(int(host)))
    dbase = ck(cu.cuMemHostGetDevicePointer(host, 0))
    lines_d = ck(cu.cuMemAlloc(64))
    out_d = ck(cu.cuMemAlloc(64))
    cases = [
        ("one warp", [0]),
        ("two warps, same line", [0, 0]),
        ("two warps, lines 0 and 1", [0, 1]),
        ("two warps, lines 4 KB apart", [0, 64]),
    ]
    for rnd in range(2):
        for host_writes in (False, True):
            for name, lines in cases:
                arr = np.array(lines, np.int32)
                ck(cu.cuMemcpyHtoD(lines_d, arr.ctypes.data, arr.nbytes))
                vals = [
                    np.array([int(dbase)], np.uint64),
                    np.array([int(lines_d)], np.uint64),
                    np.array([polls], np.uint64),
                    np.array([int(out_d)], np.uint64),
                ]
                args = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
                ck(cu.cuLaunchKernel(fn, 1, 1, 1, 32 * len(lines), 1, 1, 0, st, args.ctypes.data, 0))
                writes = 0
                views = [mem[8 * ln : 8 * ln + 8] for ln in sorted(set(lines))]
                while True:
                    r = cu.cuStreamQuery(st)[0]
                    if r != cu.CUresult.CUDA_ERROR_NOT_READY:
                        ck(r)
                        break
                    if host_writes:
                        for v in views:
                            v.fill(writes)
                        writes += 1
                out = np.zeros(8, np.uint64)
                ck(cu.cuMemcpyDtoH(out.ctypes.data, out_d, 64))
                per = [(int(out[3 * w]) / polls, int(out[3 * w + 1]) / polls) for w in range(len(lines))]
                desc = "; ".join(f"warp {w}: {c:,.0f} cycles {n:,.0f} ns" for w, (c, n) in enumerate(per))
                print(
                    f"round {rnd} host {'writing' if host_writes else 'idle   '} {name:30s}: {desc}"
                    f"{f' ({writes} host stores)' if host_writes else ''}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
