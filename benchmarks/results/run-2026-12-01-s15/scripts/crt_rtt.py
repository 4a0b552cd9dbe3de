"""Issue 11 diagnostic: the 64 B round trip from CPython (GpuQueue.enqueue, spin, try_dequeue_result)
against the same protocol's stores from compiled C (libcrt.so), against the same running kernel,
interleaved rounds.  What the host's Python costs the round trip."""

import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from gpuq_driver import GpuQueue, QueueConfig
from gpuq_driver.layout import CHECK_LOW

lib = ctypes.CDLL(str(Path(__file__).with_name("libcrt.so")))
lib.run.restype = ctypes.c_int64
lib.run.argtypes = (
    [ctypes.c_void_p] * 6
    + [ctypes.c_uint64] * 3
    + [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]
)


def addr(mv):
    return np.frombuffer(mv, dtype=np.uint8).ctypes.data


def py_round(q, payloads, iters):
    enqueue, take, ids, mask = q.enqueue, q.try_dequeue_result, q._res_hdr, q._mask
    clock = time.perf_counter_ns
    out = np.empty((iters, 2), np.int64)
    bad = 0
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
        bad += r != p
        out[i] = (t1 - t, t2 - t)
    return out, bad


def inline_round(q, payloads, iters):
    """The fewest Python operations that make the same stores: no call, no lock, no checks."""
    from zlib import crc32

    clock = time.perf_counter_ns
    out = np.empty((iters, 2), np.int64)
    bad = 0
    req_data, req_hdr, h32, ids, res_data, doorbell, front = (
        q._req_data,
        q._req_hdr,
        q._req_hdr32,
        q._res_hdr,
        q._res_data,
        q._doorbell,
        q._front,
    )
    mask, sb, one_read, ready = q._mask, q._sb, q._one_read, 1 << 32
    with q._plock, q._clock:
        head = q._head
        for i in range(iters):
            p = payloads[i & 15]
            t = clock()
            seq = head
            slot = seq & mask
            off = slot * sb
            req_data[off : off + 64] = p
            s2 = slot << 1
            if one_read and seq - front[0] < 2:
                h32[s2 << 1] = 64
                h32[(s2 << 1) | 1] = (crc32(p, seq ^ 64 << 24) | 0xFF) ^ CHECK_LOW
            else:
                req_hdr[s2] = 64 | ready
            req_hdr[s2 | 1] = seq
            head = seq + 1
            doorbell[0] = head
            idx = s2 | 1
            while ids[idx] != seq:
                pass
            t1 = clock()
            r = res_data[off : off + (ids[s2] & 0xFFFFFFFF)].tobytes()
            t2 = clock()
            bad += r != p
            out[i] = (t1 - t, t2 - t)
        q._head = head
        q._tail = q._polled = head
        q._limit = head + q._cap
    return out, bad


def c_round(q, flat, iters):
    out = np.empty((iters, 2), np.int64)
    head = q._head
    with q._plock, q._clock:
        bad = lib.run(
            addr(q._req_data),
            addr(q._req_hdr),
            addr(q._res_hdr),
            addr(q._res_data),
            addr(q._doorbell),
            addr(q._front),
            head,
            q._mask,
            q._sb,
            flat,
            64,
            iters,
            int(q._one_read),
            CHECK_LOW,
            out.ctypes.data,
        )
        q._head = head + iters  # the Python side's books follow: every result taken, in order
        q._tail = q._polled = q._head
        q._limit = q._tail + q._cap
    return out, bad


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(16)]
    flat = ctypes.create_string_buffer(b"".join(payloads), 16 * 64)
    cfgs = {"two reads": {}, "one read": {"one_read": True}, "one read + scout": {"one_read": True, "scouts": 1}}
    res = {}
    for name, cfg in cfgs.items():
        with GpuQueue(
            QueueConfig(capacity=1024, slot_bytes=64, lease_ms=float("inf"), linger_ms=float("inf"), **cfg)
        ) as q:
            py_round(q, payloads, 1000)
            c_round(q, flat, 1000)
            acc = {"python": [], "inline": [], "c": []}
            bad = {"python": 0, "inline": 0, "c": 0}
            rounds = {"python": [], "inline": [], "c": []}
            for _r in range(6):
                for kind, fn, arg in (
                    ("python", py_round, payloads),
                    ("inline", inline_round, payloads),
                    ("c", c_round, flat),
                ):
                    a, b = fn(q, arg, iters)
                    acc[kind].append(a)
                    rounds[kind].append(round(float(np.median(a[:, 0])) / 1e3, 2))
                    bad[kind] += b
            st = q.stats()
        for kind in acc:
            a = np.concatenate(acc[kind]) / 1e3
            p50, p99 = np.percentile(a, 50, axis=0), np.percentile(a, 99, axis=0)
            res[f"{name} / {kind}"] = dict(
                readable_p50=p50[0], readable_p99=p99[0], taken_p50=p50[1], taken_p99=p99[1], bad=bad[kind]
            )
            print(
                f"{name:18s} {kind:7s} readable p50 {p50[0]:.2f} p99 {p99[0]:.2f} | taken p50 {p50[1]:.2f} p99 {p99[1]:.2f} | wrong {bad[kind]} | rounds {rounds[kind]}",
                flush=True,
            )
        print(f"   spec_reads {st.spec_reads} retries {st.spec_retries} processed {st.processed}", flush=True)
    if os.environ.get("OUT"):
        json.dump(res, open(os.path.join(os.environ["OUT"], "crt_rtt.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
