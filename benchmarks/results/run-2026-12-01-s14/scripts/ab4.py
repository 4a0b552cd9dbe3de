"""Session 14: is one_read's 4 KB round trip slower because of leases (the CRC table's copy at each
lease's start)? 4 KB two reads / one read, 1 ms leases and never leaving, interleaved."""
import os, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_latency as bl

inf = float("inf")
it = int(os.environ.get("ITERS", 12000))
bl.queue_round_trip(4096, it // 6)
for size in (4096, 512):
    c = {"two": {}, "one": {"one_read": True}, "two_never": {"lease_ms": inf}, "one_never": {"one_read": True, "lease_ms": inf}}
    bl.round_trips_interleaved(size, it, c, blocks=6)
