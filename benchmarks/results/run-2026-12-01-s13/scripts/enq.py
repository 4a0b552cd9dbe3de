import math
import sys

sys.path.insert(0, "benchmarks")
from bench_latency import enqueue_throughput_interleaved

never = {"lease_ms": math.inf}
cfgs = {
    "default": {},
    "never_leaves": never,
    "one_read": {"one_read": True},
    "one_read_never": {"one_read": True, **never},
}
for name, r in enqueue_throughput_interleaved(1_000_000, cfgs).items():
    print(
        f"enqueue {name}: {r['enqueue_msg_per_s']:,.0f} msg/s (rounds {', '.join(f'{x:,.0f}' for x in r['rounds_msg_per_s'])}), mismatches {r['mismatches']}, launches {r['launches']}",
        flush=True,
    )
