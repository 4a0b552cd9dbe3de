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
    const uint64_t v = gpuq::load_acquire_sys(ping);
    if (v == GPUQ_NO_MSG) break;
    if (v != last) {
      gpuq::store_release_sys(pong, v);
      last = v;
    }
  }
}
