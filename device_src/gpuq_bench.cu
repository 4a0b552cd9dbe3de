// gpuq_bench.cu -- reference kernels for benchmarks/: the floors the queue is measured against.
#include "gpuq_layout.cuh"
#include "gpuq_sync.cuh"

// Launch overhead floor: launch + synchronize with no work.
extern "C" __global__ void gpuq_empty() {}

// Flag ping-pong floor: the host writes *ping = i (i = 1, 2, ...), one thread answers *pong = i;
// *ping = GPUQ_NO_MSG ends the kernel.  Both words are in host-mapped pinned memory.
extern "C" __global__ void gpuq_pingpong(uint64_t* ping, uint64_t* pong) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  uint64_t last = 0;
  for (;;) {
    const uint64_t v = gpuq::load_acquire<gpuq::kSys>(ping);
    if (v == GPUQ_NO_MSG) break;
    if (v != last) {
      gpuq::store_release<gpuq::kSys>(pong, v);
      last = v;
    }
  }
}

// The ping-pong with the queue's extra steps, to price each one (benchmarks/bench_latency.py):
//   mode bit 0: after the ping, read 64 B of host-mapped `data` (one more PCIe round trip);
//   mode bit 1: write 64 B of host-mapped `out` before the release of pong (the publish step).
// One warp; *ping = GPUQ_NO_MSG ends it.
extern "C" __global__ void gpuq_pingpong_ex(uint64_t* ping, uint64_t* pong, const uint4* data, uint4* out,
                                            uint32_t mode) {
  if (blockIdx.x != 0 || threadIdx.x >= 32) return;
  const uint32_t lane = threadIdx.x;
  uint64_t last = 0;
  for (;;) {
    uint64_t v = 0;
    if (lane == 0) {
      do { v = gpuq::load_acquire<gpuq::kSys>(ping); } while (v == last);
    }
    v = __shfl_sync(0xFFFFFFFFu, v, 0);
    if (v == GPUQ_NO_MSG) break;
    last = v;
    uint4 d = make_uint4(static_cast<uint32_t>(v), 0u, 0u, 0u);
    if ((mode & 1u) && lane < 4u) d = __ldcv(data + lane);
    if ((mode & 2u) && lane < 4u) out[lane] = d;
    else if (d.y == 0x9E3779B9u && d.z == 0x7F4A7C15u && lane < 4u) out[lane] = d;  // keeps the read
    __syncwarp();
    if (lane == 0) gpuq::store_release<gpuq::kSys>(pong, v);
  }
}
