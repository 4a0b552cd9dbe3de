#!/usr/bin/env python3
"""Smoke run: start a queue on GPU 0, send 1,000 random messages, check them, shut down; prints
what it did at each step so a hang shows where.  Exit 0 on success."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuq_driver import GpuQueue, QueueConfig, device_info  # noqa: E402

t0 = time.perf_counter()
print("device:", device_info(0), flush=True)
with GpuQueue(QueueConfig(capacity=256, slot_bytes=128)) as q:
    print(f"started in {time.perf_counter() - t0:.2f} s: {q.stats()}", flush=True)
    payloads = [os.urandom(i % 129) for i in range(1000)]
    bad = 0
    for p in payloads:
        bad += q.wait_result(q.enqueue(p), timeout=5) != p
    print(f"1000 messages, {bad} mismatched: {q.stats()}", flush=True)
    q.shutdown()
    print("shut down:", q.stats(), flush=True)
print(f"closed; total {time.perf_counter() - t0:.2f} s")
sys.exit(1 if bad else 0)
