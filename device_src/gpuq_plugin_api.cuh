// gpuq_plugin_api.cuh -- what a plugin may use besides its own arguments: the per-queue parameters
// and the per-message failure status.  Included by the kernels (gpuq_queue.cu, gpuq_batch.cu)
// before the plugin, so every plugin sees it; a plugin compiled on its own (and linked in later)
// includes it itself.  Python mirror: gpuq_driver/plugins.py (FAIL_BIT, MAX_FAIL_CODE).
//
// Per-queue parameters (QueueConfig(params=...), BatchProcessor(params=...)): one array of bytes,
// uploaded to VRAM once, before the kernel's first launch, and never changed while it runs
// (model weights, a lookup table, a key).  Read-only for the plugin.
//   gpuq_params()        the array (device memory, 256-byte aligned: any scalar or vector type
//                        may be read from it); nullptr when the queue has none
//   gpuq_params_bytes()  its size in bytes, 0 .. 2^30; 0 when none
// Reading it costs a global load (L2/L1-cached); read the pointer once per message.
//
// Per-message status: a plugin that cannot process a message returns GPUQ_FAIL(code), code
// 0..65535 (by convention 1..65535; 0 is allowed and means "failed, no code"), on every lane.
// The message is DONE with an empty result and that code; taking it raises
// gpuq_driver.MessageFailed (.msg_id, .code); the queue and every other message go on, and it is
// not a protocol error.  Any return value >= GPUQ_FAIL_BIT is such a failure, with code
// value & 0xFFFF (so returning (uint32_t)-1 fails with code 65535).  A return value above out_cap
// and below GPUQ_FAIL_BIT is still a BAD_RESULT protocol error (a broken plugin).
// The twin's side: raise gpuq_driver.plugins.Fail(code).
#pragma once

#ifdef __CUDACC_RTC__
#include <cuda/std/cstdint>
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::uint8_t;
#else
#include <stdint.h>  // the types in the global namespace, as plugins use them
#endif

struct GpuqParams {
  const uint8_t* ptr;  // nullptr when none
  uint64_t bytes;      // 0 when none
};

// Defined once in each kernel translation unit (gpuq_queue.cu, gpuq_batch.cu); the host sets it
// (cuModuleGetGlobal + a copy) before the first launch.
extern __device__ GpuqParams gpuq_params_g;

__device__ __forceinline__ const uint8_t* gpuq_params() { return gpuq_params_g.ptr; }  // nullptr when none
__device__ __forceinline__ uint64_t gpuq_params_bytes() { return gpuq_params_g.bytes; }

#define GPUQ_FAIL_BIT 0x80000000u
#define GPUQ_FAIL(code) (0x80000000u | ((uint32_t)(code) & 0xFFFFu))  // return this from gpuq_process to fail the message with code 1..65535
