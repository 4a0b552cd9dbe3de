#!/usr/bin/env python3
"""How many host-written lines the polling warp reads, and what it costs the round trip (issue 11).
Standalone (cuda-python and numpy only, as ../shared/probes/inline_probe.py, which it extends).
Host (Python, numpy) writes a 64 B payload line, then a header word in another line, then (modes
with a doorbell) a doorbell word in a third line; one warp polls.  RTT p50/p99 and torn reads.
modes: 1 = payload line only, seq in its last word (the issue's probe)
       2 = payload line + header line, one read (lanes 0-3 payload, lane 4 header)
       3 = 2 + doorbell line in the same read (lane 5)            (gpuq one_read today)
       4 = doorbell first, then payload + header (two reads)        (gpuq default today)
       5 = 3 but the doorbell read only every 4th poll
Prints one line per mode (1-5, then 1, 3, 4 again); writes nothing.

    python3 benchmarks/probe_lines.py [N]
"""

import ctypes
import sys
import time

import numpy as np
from cuda.bindings import driver as cu
from cuda.bindings import nvrtc


def ck(r):
    err = r[0] if isinstance(r, tuple) else r
    if int(err) != 0:
        raise RuntimeError(str(r))
    return r[1] if isinstance(r, tuple) and len(r) == 2 else None


SRC = rb"""
extern "C" __global__ void probe(const volatile unsigned long long* data, const volatile unsigned long long* hdr,
                                 const volatile unsigned long long* db, int mode,
                                 volatile unsigned long long* res, unsigned long long n, unsigned long long* torn) {
  const int lane = threadIdx.x;
  unsigned long long bad = 0;
  unsigned poll = 0;
  for (unsigned long long seq = 1; seq <= n; ++seq) {
    if (mode == 4) {
      if (lane == 0) { while (db[0] < seq) { } }
      __syncwarp();
    }
    while (true) {
      ++poll;
      unsigned long long v = seq, h = 0, d = seq;
      if (mode == 1) { v = lane < 8 ? data[lane] : seq; h = __shfl_sync(0xffffffffu, v, 7); }
      else {
        if (lane < 8) v = data[lane];
        else if (lane == 8) h = hdr[0];
        else if (lane == 9 && (mode == 3 || (mode == 5 && (poll & 3u) == 0u))) d = db[0];
        h = __shfl_sync(0xffffffffu, h, 8);
      }
      if (h != seq) continue;
      if (__all_sync(0xffffffffu, v == seq)) break;
      if (lane == 0) bad++;
    }
    if (lane == 0) { __threadfence_system(); res[0] = seq; }
    __syncwarp();
  }
  if (lane == 0) torn[0] = bad;
}
"""


def probe_function(src: bytes, name: bytes = b"probe"):
    """Device 0's primary context made current, ``src`` compiled by NVRTC to a CUBIN for its exact
    sm_XY and loaded; returns (the function ``name``, a non-blocking stream).  Raises RuntimeError
    with NVRTC's log if the source does not compile."""
    ck(cu.cuInit(0))
    dev = ck(cu.cuDeviceGet(0))
    ck(cu.cuCtxSetCurrent(ck(cu.cuDevicePrimaryCtxRetain(dev))))
    maj = ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
    mnr = ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    prog = ck(nvrtc.nvrtcCreateProgram(src, b"p.cu", 0, [], []))
    if int(nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{maj}{mnr}".encode()])[0]) != 0:
        log = b" " * nvrtc.nvrtcGetProgramLogSize(prog)[1]
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.decode())
    cub = b" " * ck(nvrtc.nvrtcGetCUBINSize(prog))
    nvrtc.nvrtcGetCUBIN(prog, cub)
    fn = ck(cu.cuModuleGetFunction(ck(cu.cuModuleLoadData(cub)), name))
    return fn, ck(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    fn, st = probe_function(SRC)
    flags = cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE
    bufs = [ck(cu.cuMemHostAlloc(4096, flags)) for _ in range(4)]
    views = [np.ctypeslib.as_array((ctypes.c_uint64 * 512).from_address(int(b))) for b in bufs]
    dptr = [ck(cu.cuMemHostGetDevicePointer(b, 0)) for b in bufs]
    data, hdr, db, res = views
    torn_d = ck(cu.cuMemAlloc(8))
    for mode in (1, 2, 3, 4, 5, 1, 3, 4):
        for v in views:
            v[:] = 0
        vals = [
            np.array([int(dptr[0])], np.uint64),
            np.array([int(dptr[1])], np.uint64),
            np.array([int(dptr[2])], np.uint64),
            np.array([mode], np.int32),
            np.array([int(dptr[3])], np.uint64),
            np.array([N], np.uint64),
            np.array([int(torn_d)], np.uint64),
        ]
        args = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
        ck(cu.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, st, args.ctypes.data, 0))
        payload = data[:7] if mode == 1 else data[:8]
        ts = np.empty(N, dtype=np.int64)
        clock = time.perf_counter_ns
        for seq in range(1, N + 1):
            t = clock()
            payload.fill(seq)
            if mode == 1:
                data[7] = seq
            else:
                hdr[0] = seq
                db[0] = seq
            while res[0] != seq:
                pass
            ts[seq - 1] = clock() - t
        ck(cu.cuStreamSynchronize(st))
        torn = np.zeros(1, np.uint64)
        ck(cu.cuMemcpyDtoH(torn.ctypes.data, torn_d, 8))
        w = ts[N // 10 :] / 1e3
        print(
            f"mode {mode}: p50 {np.percentile(w, 50):5.2f} us  p99 {np.percentile(w, 99):5.2f} us  torn {int(torn[0])} of {N}",
            flush=True,
        )


if __name__ == "__main__":
    main()
