#!/usr/bin/env python3
"""How long the GPU takes to hand over from one lease to the next, with nothing of the queue in it
(issue 11 diagnostic for the p99 at 1 ms leases; docs/design.md, "Alternatives").

A bare cooperative grid plays a lease: block 0 notes when it is resident, every block's thread 0
waits until a VRAM counter (leases ended, acquire) reaches the lease's number, block 0 notes when
it took over, the grid works ``--work-us``, and the last block out notes the end and releases the
counter.  The host launches lease n once lease n-1 has taken over (the queue's rule: a successor
is launched once the newest lease has begun).  Prints, per way of launching, the hand-over (the
predecessor's end -> the successor's take-over) and how often the successor was resident before
its predecessor ended:

- one stream, ``cuLaunchCooperativeKernel`` (the queue's way): the successor waits in the stream;
- one stream, Programmatic Dependent Launch: ``griddepcontrol.launch_dependents`` in the kernel,
  ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` beside ``..._COOPERATIVE``;
- two streams, alternating: the successor is resident while its predecessor runs.

    PYTHONPATH=. python benchmarks/probe_handover.py
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda.bindings import driver as cu  # noqa: E402
from cuda.bindings import nvrtc  # noqa: E402

from gpuq_driver import driver  # noqa: E402
from gpuq_driver.errors import check  # noqa: E402

SRC = r"""
__device__ __forceinline__ unsigned long long now() {
  unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long* p) {
  unsigned long long v; asm volatile("ld.acquire.gpu.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ void st_release(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory"); }
// dev[0]: leases ended, dev[1]: blocks out (all leases); host[4n ..]: resident, took over, end (ns)
extern "C" __global__ void lease(unsigned long long* dev, volatile unsigned long long* host, unsigned int n,
                                 unsigned long long work_ns, unsigned int pdl) {
  if (pdl) asm volatile("griddepcontrol.launch_dependents;");
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) host[n * 4 + 0] = now();
    while (ld_acquire(dev) < n) { }
  }
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x == 0) host[n * 4 + 1] = now();
  const unsigned long long t0 = now();
  while (now() - t0 < work_ns) { }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(dev + 1, 1ull) + 1ull == (unsigned long long)gridDim.x * (n + 1ull)) {
      host[n * 4 + 2] = now();
      st_release(dev, n + 1ull);
    }
  }
}
"""


def cubin(arch: str) -> bytes:
    prog = check(nvrtc.nvrtcCreateProgram(SRC.encode(), b"handover.cu", 0, [], []), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise SystemExit(log.decode())
    size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    out = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leases", type=int, default=60, help="leases per case")
    ap.add_argument("--blocks", type=int, default=0, help="grid blocks (0: one per SM, as the queue)")
    ap.add_argument("--threads", type=int, default=128)
    ap.add_argument("--work-us", type=int, default=200, help="how long each lease works (µs)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    driver.primary_context(0).make_current()
    info = driver.device_info(0)
    mod = check(cu.cuModuleLoadData(cubin(info.arch)), "cuModuleLoadData")
    fn = check(cu.cuModuleGetFunction(mod, b"lease"), "cuModuleGetFunction")
    blocks = args.blocks or info.sm_count
    print(f"{info.name}: {blocks} blocks x {args.threads} threads, {args.leases} leases of {args.work_us} µs per case")
    n_leases = args.leases
    host = check(cu.cuMemHostAlloc(n_leases * 32, cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE), "alloc")
    times = (ctypes.c_uint64 * (n_leases * 4)).from_address(int(host))
    host_dev = check(cu.cuMemHostGetDevicePointer(host, 0), "cuMemHostGetDevicePointer")
    dev = check(cu.cuMemAlloc(64), "cuMemAlloc")
    streams = [check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate") for _ in range(2)]

    def launch_ex(stream, packed, pdl: bool) -> None:
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = blocks, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = args.threads, 1, 1
        cfg.sharedMemBytes, cfg.hStream = 0, stream
        attrs = [cu.CUlaunchAttribute()]
        attrs[0].id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
        attrs[0].value.cooperative = 1
        if pdl:
            attrs.append(cu.CUlaunchAttribute())
            attrs[1].id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attrs[1].value.programmaticStreamSerializationAllowed = 1
        cfg.attrs, cfg.numAttrs = attrs, len(attrs)
        check(cu.cuLaunchKernelEx(cfg, fn, packed.address, 0), "cuLaunchKernelEx")

    def case(name: str, how: str) -> None:
        check(cu.cuMemsetD8(dev, 0, 64), "cuMemsetD8")
        check(cu.cuCtxSynchronize(), "cuCtxSynchronize")
        for i in range(n_leases * 4):
            times[i] = 0
        keep = []  # the packed arguments live until the launches are done
        for n in range(n_leases):
            values = [
                ctypes.c_uint64(int(dev)),
                ctypes.c_uint64(int(host_dev)),
                ctypes.c_uint32(n),
                ctypes.c_uint64(args.work_us * 1000),
                ctypes.c_uint32(how == "pdl"),
            ]
            packed = driver.LaunchArgs(values)
            keep.append(packed)
            deadline = time.monotonic() + 5
            while n and times[(n - 1) * 4 + 1] == 0:  # launch once the newest lease has taken over
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: lease {n - 1} never took over")
            stream = streams[n & 1] if how == "two" else streams[0]
            if how == "one":
                check(
                    cu.cuLaunchCooperativeKernel(fn, blocks, 1, 1, args.threads, 1, 1, 0, stream, packed.address),
                    "cuLaunchCooperativeKernel",
                )
            else:
                launch_ex(stream, packed, pdl=how == "pdl")
        check(cu.cuCtxSynchronize(), "cuCtxSynchronize")
        t = np.array(times[: n_leases * 4], dtype=np.int64).reshape(n_leases, 4)
        gap = (t[1:, 1] - t[:-1, 2]) / 1e3
        early = (t[1:, 0] < t[:-1, 2]).mean()
        print(
            f"{name:44s} hand-over µs p50 {np.median(gap):5.2f} p90 {np.percentile(gap, 90):5.2f} "
            f"max {gap.max():5.2f}; resident before its predecessor ended: {early:.0%}",
            flush=True,
        )

    for _ in range(args.rounds):
        case("one stream, cooperative (the queue's way)", "one")
        case("one stream, cooperative + PDL", "pdl")
        case("two streams, cooperative, alternating", "two")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
