// echo.cuh -- the default processing function: the result is the payload, byte for byte.
//
// Plugin contract (every file in plugins/ defines exactly this function):
//   Called by all 32 lanes of one warp, `lane` = 0..31.
//   in      : the payload in the message's VRAM slot, `len` bytes, 16-byte aligned; the slot is
//             padded to a multiple of 16 bytes, so reading whole 16-byte words is safe.
//   out     : the result buffer (host-mapped pinned memory), `out_cap` bytes, 16-byte aligned.
//   returns : the result length in bytes (the same value on every lane), at most `out_cap`.
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
