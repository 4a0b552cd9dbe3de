#!/usr/bin/env python3
"""A plugin of your own: byte-reverse each message on the GPU, checked against its Python twin.

The plugin is CUDA source given as a string (Plugin.from_source); every lane of the warp reverses
its share of the payload into the result slot.  Its twin is the same function in Python, which
the CPU simulator runs in place of the device code; every result is compared with the twin's.

    python examples/custom_plugin.py                  # 10,000 messages on GPU 0
    python examples/custom_plugin.py --backend sim    # the CPU simulator, no GPU needed

Where no CUDA GPU exists (and --backend sim is not given) it prints one line and exits 2.

Exit codes: 0 every result matched the twin; 1 a result differed; 2 bad arguments, or no usable GPU.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from gpuq_driver import ConfigError, CudaUnavailable, GpuQueue, QueueConfig
from gpuq_driver.plugins import Plugin

REVERSE_SOURCE = r"""
// The plugin contract (docs/api.md, "Plugins"): all 32 lanes of one warp call this per message;
// write at most out_cap bytes and return the result length, the same on every lane.
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)msg_id;
  (void)out_cap;  // len <= out_cap always: the result fits its slot
  for (uint32_t i = lane; i < len; i += 32u) out[len - 1u - i] = in[i];
  return len;
}
"""


def reverse_twin(payload: memoryview, msg_id: int) -> bytes:
    """The same function in Python: the payload's bytes in reverse order."""
    return bytes(payload)[::-1]


REVERSE = Plugin.from_source("reverse", REVERSE_SOURCE, twin=reverse_twin)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="custom_plugin", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1]
    )
    ap.add_argument("--messages", type=int, default=10_000, help="messages to send (default 10,000)")
    ap.add_argument("--slot-bytes", type=int, default=256, help="max payload bytes, a multiple of 16 (default 256)")
    ap.add_argument("--backend", choices=["cuda", "sim"], default="cuda", help="the GPU (default), or the simulator")
    args = ap.parse_args(argv)
    if args.messages < 1:
        ap.error(f"--messages {args.messages}: send at least 1")
    try:
        config = QueueConfig(capacity=1024, slot_bytes=args.slot_bytes, plugin=REVERSE, backend=args.backend)
    except ConfigError as exc:
        ap.error(str(exc))  # exits 2 with the usage line
    try:
        queue = GpuQueue(config)
    except CudaUnavailable as exc:
        print(
            f"custom_plugin: needs an NVIDIA GPU with its driver; none usable here ({exc.text}); "
            "--backend sim runs the example on the CPU simulator",
            file=sys.stderr,
        )
        return 2

    rng = np.random.default_rng(0)
    sizes = [0, 1, 31, 32, 33, args.slot_bytes] + rng.integers(0, args.slot_bytes + 1, args.messages).tolist()
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes[: args.messages]]
    mismatched = 0
    with queue:
        for start in range(0, len(payloads), 512):  # a batch in flight, then its results
            batch = payloads[start : start + 512]
            ids = [queue.enqueue(p) for p in batch]
            for msg_id, payload in zip(ids, batch):
                result = queue.wait_result(msg_id, timeout=10.0)
                if result != reverse_twin(memoryview(payload), msg_id):
                    mismatched += 1
                    if mismatched <= 3:
                        print(f"msg_id {msg_id} ({len(payload)} bytes): result differs from the twin's")
    where = "the GPU" if args.backend == "cuda" else "the CPU simulator"
    print(f"plugin {REVERSE.name!r} on {where}: {len(payloads):,} messages, {mismatched} differ from the twin")
    print("OK" if not mismatched else "FAILED")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
