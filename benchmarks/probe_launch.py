#!/usr/bin/env python3
"""What one lease launch costs the calling Python thread, by launch API (the relaunch is on the
hot path once per lease, and the whole cost of the first message after an idle period).

The queue's own kernel and arguments, with ABORT in the doorbell so that each launch returns at
once; the stream is synchronised every 50 launches.  Prints p50 / p99 µs per call of:
cuLaunchCooperativeKernel, cuLaunchKernel, cuGraphLaunch of a one-node graph (cooperative node
attribute), cuCtxSetCurrent, the queue's own launch (``kernel.launch()``: a graph launch since the
thirteenth session) beside the one before it (make the context current, then
cuLaunchCooperativeKernel), and a launch + wait until the kernel has begun (leases_begun moved).

    PYTHONPATH=. python benchmarks/probe_launch.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda.bindings import driver as cu  # noqa: E402

from gpuq_driver import GpuQueue, QueueConfig, driver  # noqa: E402
from gpuq_driver.errors import check  # noqa: E402
from gpuq_driver.layout import STOP_ABORT, request_stop  # noqa: E402


def timed(fn, n=2000, sync=None):
    out = np.empty(n, np.int64)
    for i in range(n):
        t = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t
        if sync and i % 50 == 49:
            sync()
    a = out / 1e3
    return f"p50 {np.percentile(a, 50):7.2f} us  p99 {np.percentile(a, 99):7.2f} us"


def main():
    q = GpuQueue(QueueConfig(capacity=64, slot_bytes=64))
    q.pause()
    k = q._kernel
    request_stop(k.doorbell, STOP_ABORT)  # every launch below exits at once
    s, fn = k.stream, k._fn
    h = s.handle
    sync = s.synchronize
    k.ctx.make_current()
    args = k._args.address

    def coop():
        check(cu.cuLaunchCooperativeKernel(fn, k.blocks, 1, 1, k.threads, 1, 1, 0, h, args), "coop")

    def plain():
        check(cu.cuLaunchKernel(fn, k.blocks, 1, 1, k.threads, 1, 1, 0, h, args, 0), "plain")

    p = cu.CUDA_KERNEL_NODE_PARAMS()
    p.func, p.gridDimX, p.gridDimY, p.gridDimZ = fn, k.blocks, 1, 1
    p.blockDimX, p.blockDimY, p.blockDimZ, p.sharedMemBytes = k.threads, 1, 1, 0
    p.kernelParams = args
    graph = check(cu.cuGraphCreate(0), "cuGraphCreate")
    node = check(cu.cuGraphAddKernelNode(graph, None, 0, p), "cuGraphAddKernelNode")
    v = cu.CUkernelNodeAttrValue() if hasattr(cu, "CUkernelNodeAttrValue") else cu.CUlaunchAttributeValue()
    v.cooperative = 1
    check(cu.cuGraphKernelNodeSetAttribute(node, cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE, v), "attr")
    gexec = check(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def graph_launch():
        check(cu.cuGraphLaunch(gexec, h), "cuGraphLaunch")

    for name, f in (
        ("cuLaunchCooperativeKernel", coop),
        ("cuLaunchKernel", plain),
        ("cuGraphLaunch (coop node)", graph_launch),
        ("cuCtxSetCurrent", k.ctx.make_current),
        ("kernel.launch() (what a kick does)", k.launch),
        ("make_current + cuLaunchCooperativeKernel", lambda: driver.launch(fn, k.blocks, k.threads, k._args, s, True)),
        ("cuLaunchCooperativeKernel again", coop),
    ):
        timed(f, 200, sync)  # warm-up
        print(f"  {name:40s} {timed(f, 2000, sync)}", flush=True)
    sync()
    begun = q._leases.begun

    def launch_and_begin():
        b = begun[0]
        k.launch()
        while begun[0] == b:
            pass

    print(f"  {'launch until the lease has begun':40s} {timed(launch_and_begin, 500, sync)}", flush=True)
    sync()
    # After 5 ms of nothing: the host CPU idles (sleep) or stays busy (spin); the GPU idles in both.
    for how in ("sleep", "spin", "sleep, graph launch, no query"):
        calls, begins, query = [], [], []
        for _ in range(300):
            if how.startswith("sleep"):
                time.sleep(5e-3)
            else:
                end = time.perf_counter() + 5e-3
                while time.perf_counter() < end:
                    pass
            t0 = time.perf_counter_ns()
            if "graph" not in how:
                s.done()
            t1 = time.perf_counter_ns()
            b = begun[0]
            if "graph" in how:
                graph_launch()
            else:
                k.launch()
            t2 = time.perf_counter_ns()
            while begun[0] == b:
                pass
            t3 = time.perf_counter_ns()
            query.append(t1 - t0), calls.append(t2 - t1), begins.append(t3 - t1)
            sync()
        p50 = lambda a: np.percentile(np.asarray(a) / 1e3, 50)  # noqa: E731
        print(
            f"  after 5 ms idle ({how}): cuStreamQuery p50 {p50(query):.2f} us; launch call p50 {p50(calls):.2f} us; "
            f"launch until begun p50 {p50(begins):.2f} us",
            flush=True,
        )
    q.close()


if __name__ == "__main__":
    main()
