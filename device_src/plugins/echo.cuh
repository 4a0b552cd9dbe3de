// echo.cuh -- the default processing function: the result is the payload, byte for byte.
//
// Plugin contract (every plugin, here or anywhere, defines exactly this function; see
// gpuq_driver/plugins.py for how to pass one: QueueConfig(plugin="name" or a Plugin)):
//   Called by all 32 lanes of one warp per message, `lane` = 0..31 (warp shuffles and __syncwarp()
//   are fine; __syncthreads() is not: the block's other warps are serving other messages).
//   in      : the payload in the message's VRAM slot, `len` bytes, 16-byte aligned; the slot is
//             padded to a multiple of 16 bytes, so reading whole 16-byte words is safe.
//   out     : the result buffer (host-mapped pinned memory), `out_cap` (= slot_bytes) bytes,
//             16-byte aligned; write at most `out_cap` bytes (past it lies the next message's result).
//   msg_id  : the message's id (0, 1, 2, ... in enqueue order; the index in the batch in gpuq_batch).
//   returns : the result length in bytes (the same value on every lane), at most `out_cap`; or
//             GPUQ_FAIL(code), code 0..65535, to fail the message: it is DONE with an empty result
//             and taking it raises MessageFailed (.msg_id, .code); the queue and the other messages
//             go on.  Any value >= GPUQ_FAIL_BIT (0x80000000) fails it with code value & 0xFFFF.  A
//             value above `out_cap` and below that is a BAD_RESULT protocol error for that message
//             (empty result, ProtocolError: a broken plugin).
//   params  : gpuq_params() / gpuq_params_bytes(): the per-queue parameters (QueueConfig(params=...),
//             BatchProcessor(params=...)), read-only device memory uploaded once before the first
//             launch, 256-byte aligned; nullptr / 0 when none.
// Compiled as the in-memory header gpuq_plugin.cuh after gpuq_layout.cuh and gpuq_plugin_api.cuh
// (which define GpuqParams, gpuq_params(), gpuq_params_bytes(), GPUQ_FAIL and the <cuda/std/cstdint>
// types), with NVRTC; its errors are reported with the plugin file's own name and line numbers.
#pragma once

__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)out_cap;
  (void)msg_id;
  for (uint32_t off = lane * 16u; off < len; off += 32u * 16u) {
    *reinterpret_cast<uint4*>(out + off) = *reinterpret_cast<const uint4*>(in + off);
  }
  return len;
}
