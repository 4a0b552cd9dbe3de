// gpuq_batch.cu -- the same processing function over a whole batch in one launch.
// Used by the launch-per-message baseline in benchmarks/ and by Track A's batch processor.
//   in      : n slots of slot_bytes bytes each (VRAM, 16-byte aligned, slot_bytes % 16 == 0)
//   in_len  : n payload lengths in bytes
//   out     : n result slots of slot_bytes bytes each
//   out_len : n result lengths; 0x80000000 | code where the plugin failed the message
//             (GPUQ_FAIL(code), gpuq_plugin_api.cuh); 0xFFFFFFFF where it returned more than
//             slot_bytes (BAD_RESULT)
// One warp per message, grid-stride over the batch.
#include "gpuq_layout.cuh"

#include "gpuq_plugin_api.cuh"

// The per-batch-processor parameters the plugin reads (gpuq_plugin_api.cuh); set by the host
// once after the module is loaded (batch.py: cuModuleGetGlobal + a copy).
__device__ GpuqParams gpuq_params_g = {nullptr, 0u};

#ifndef GPUQ_PLUGIN_FILE
#define GPUQ_PLUGIN_FILE "plugins/echo.cuh"
#endif
#include GPUQ_PLUGIN_FILE

extern "C" __global__ void gpuq_batch(const uint8_t* in, const uint32_t* in_len, uint8_t* out,
                                      uint32_t* out_len, uint32_t n, uint32_t slot_bytes,
                                      uint64_t first_msg_id) {
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t warps = (gridDim.x * blockDim.x) >> 5;
  for (uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < n; i += warps) {
    const size_t off = static_cast<size_t>(i) * slot_bytes;
    uint32_t len = in_len[i];
    if (len > slot_bytes) len = slot_bytes;
    const uint32_t r = gpuq_process(in + off, len, out + off, slot_bytes, first_msg_id + i, lane);
    if (lane == 0) {
      out_len[i] = r <= slot_bytes ? r : r >= GPUQ_FAIL_BIT ? GPUQ_FAIL_BIT | (r & 0xFFFFu) : 0xFFFFFFFFu;
    }
  }
}
