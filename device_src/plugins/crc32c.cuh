// crc32c.cuh -- the result is the 4-byte little-endian CRC-32C (Castagnoli, as in iSCSI, ext4,
// RFC 3720: reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF) of the payload.
// Python twin: gpuq_driver.plugins.crc32c_twin.  CRC-32C of b"123456789" is 0xE3069283.
//
// Plugin contract: see echo.cuh (called by all 32 lanes of one warp; returns the same length on
// every lane, at most out_cap; here always 4, and out_cap >= 16 because slot_bytes >= 16).
//
// Warp-cooperative: lane i takes the i-th of 32 contiguous chunks (a multiple of 16 bytes each, so
// every lane reads whole aligned 16-byte words) and computes its chunk's CRC with a byte table;
// each lane then moves its CRC past the bytes after its chunk (multiplication by x^(8n) modulo the
// polynomial, as zlib's crc32_combine does) and the warp xor-reduces the 32 parts.
#pragma once

namespace gpuq_crc32c {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  uint32_t byte[256];  // CRC of one byte (raw: no initial value, no final xor)
  uint32_t x2n[32];    // x^(2^k) modulo the polynomial, reflected (x^0 is 0x80000000)
};

// a * b modulo the polynomial (both reflected).
__host__ __device__ constexpr uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0u;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1u)) == 0u) break;
    }
    m >>= 1;
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

__host__ __device__ constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256u; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
    t.byte[i] = c;
  }
  uint32_t p = 1u << 30;  // x^1
  for (int k = 0; k < 32; ++k) {
    t.x2n[k] = p;
    p = multmodp(p, p);
  }
  return t;
}

__device__ constexpr Tables kTables = make_tables();

// x^(8n) modulo the polynomial: a CRC multiplied by it is the CRC after n more zero bytes.
__device__ __forceinline__ uint32_t x8nmodp(uint32_t n) {
  uint32_t p = 1u << 31;  // x^0
  for (uint32_t k = 3; n != 0u; n >>= 1, ++k) {
    if (n & 1u) p = multmodp(kTables.x2n[k & 31u], p);
  }
  return p;
}

}  // namespace gpuq_crc32c

__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  using namespace gpuq_crc32c;
  (void)out_cap;
  (void)msg_id;
  const uint32_t chunk = ((len + 32u * 16u - 1u) / (32u * 16u)) * 16u;  // ceil(len / 32), 16-byte words
  const uint32_t begin = lane * chunk < len ? lane * chunk : len;
  const uint32_t end = begin + chunk < len ? begin + chunk : len;
  // Lane 0 starts from the initial value, the others from 0: the CRC is linear, so the parts add up.
  uint32_t crc = lane == 0u ? 0xFFFFFFFFu : 0u;
  for (uint32_t off = begin; off < end; off += 16u) {
    const uint4 w = *reinterpret_cast<const uint4*>(in + off);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    const uint32_t n = end - off < 16u ? end - off : 16u;
#pragma unroll
    for (uint32_t b = 0; b < 16u; ++b) {
      if (b < n) crc = kTables.byte[(crc ^ (words[b >> 2] >> (8u * (b & 3u)))) & 0xFFu] ^ (crc >> 8);
    }
  }
  if (end < len) crc = multmodp(x8nmodp(len - end), crc);  // move past the later chunks' bytes
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) crc ^= __shfl_xor_sync(0xFFFFFFFFu, crc, d);
  if (lane == 0u) *reinterpret_cast<uint32_t*>(out) = crc ^ 0xFFFFFFFFu;  // little-endian, like x86
  return 4u;
}
