"""LL results diagnostic: readable via byte-pair stamps (no fence on the path) vs via msg_id."""

import functools
import json
import os
import sys
import time

import numpy as np

from gpuq_driver import GpuQueue, QueueConfig, compiler, kernel

STAMPS = [bytes([i]) * 64 for i in range(256)]


def samples(ll_kernel, ll_spin, iters, warm=500, **cfg):
    kernel.CompileOptions = functools.partial(compiler.CompileOptions, defines=("GPUQ_DIAG_LL",) if ll_kernel else ())
    payloads = [np.random.default_rng(i).integers(0, 256, 64, dtype=np.uint8).tobytes() for i in range(16)]
    out = np.empty((iters, 3), np.int64)
    bad = torn = 0
    with GpuQueue(QueueConfig(capacity=1024, slot_bytes=256, one_read=True, **cfg)) as q:
        rd, ids, mask, enqueue, take = q._res_data, q._res_hdr, q._mask, q.enqueue, q.try_dequeue_result
        clock = time.perf_counter_ns
        for i in range(iters + warm):
            p = payloads[i & 15]
            t = clock()
            mid = enqueue(p)
            off = (mid & mask) * 256
            if ll_spin:
                g = ((mid >> 10) + 1) & 0xFF
                b = off + 65
                while True:
                    if rd[b] == g:
                        raw = rd[off + 64 : off + 200].tobytes()
                        if raw[9::2] == STAMPS[g]:
                            data = raw[8 : 8 + 2 * raw[0] : 2]
                            break
                        torn += 1
                t1 = clock()
                bad += data != p
            idx = ((mid & mask) << 1) | 1
            while ids[idx] != mid:
                pass
            t2 = clock()
            r = take(mid)
            t3 = clock()
            bad += r != p
            if not ll_spin:
                t1 = t2
            if i >= warm:
                out[i - warm] = (t1 - t, t2 - t, t3 - t)
    return out, bad, torn


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = 4
    cases = {
        "default/msgid": (False, False, {}),
        "ll/ll": (True, True, {}),
        "ll/msgid": (True, False, {}),
        "default/msgid scout": (False, False, {"scouts": 1}),
        "ll/ll scout": (True, True, {"scouts": 1}),
        "default/msgid inf": (False, False, {"lease_ms": float("inf")}),
        "ll/ll inf": (True, True, {"lease_ms": float("inf")}),
    }
    acc = {k: [] for k in cases}
    meta = {k: [0, 0] for k in cases}
    for _r in range(rounds):
        for k, (lk, ls, cfg) in cases.items():
            a, bad, torn = samples(lk, ls, iters, **cfg)
            acc[k].append(a)
            meta[k][0] += bad
            meta[k][1] += torn
    res = {}
    for k, arrs in acc.items():
        a = np.concatenate(arrs) / 1e3
        p50 = np.percentile(a, 50, axis=0)
        p99 = np.percentile(a, 99, axis=0)
        res[k] = dict(
            readable_p50=p50[0],
            readable_p99=p99[0],
            msgid_p50=p50[1],
            taken_p50=p50[2],
            taken_p99=p99[2],
            bad=meta[k][0],
            torn=meta[k][1],
        )
        print(
            f"{k:22s} readable p50 {p50[0]:.2f} p99 {p99[0]:.2f} | msg_id p50 {p50[1]:.2f} | taken p50 {p50[2]:.2f} p99 {p99[2]:.2f} | bad {meta[k][0]} ll-retries {meta[k][1]}",
            flush=True,
        )
    out = os.environ.get("OUT")
    if out:
        json.dump(res, open(os.path.join(out, "lldiag.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
