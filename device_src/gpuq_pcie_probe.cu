// gpuq_pcie_probe.cu -- copy kernels for benchmarks/probe_pcie.py (PCIe bandwidth of SM loads and
// stores to host-mapped pinned memory).  Not used by the queue; includes nothing of it.
//
// Each warp copies whole rows of `row_words` 16-byte words, rows taken in a grid-stride loop over
// the grid's warps; within a row each lane keeps 4 uint4 loads in flight (words lane, lane+32,
// lane+64, lane+96: 2 KB per warp per step), then stores them.  blockDim.x must be a multiple of 32.
// src and dst may each be VRAM or a host-mapped device pointer.

template <bool kLdcv>
__device__ __forceinline__ void copy_rows(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                          unsigned long long rows, unsigned int row_words) {
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned long long warps = (static_cast<unsigned long long>(gridDim.x) * blockDim.x) >> 5;
  for (unsigned long long r = (static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
       r < rows; r += warps) {
    const uint4* s = src + r * row_words;
    uint4* d = dst + r * row_words;
    for (unsigned int w = lane; w < row_words; w += 128u) {
      uint4 v[4];
#pragma unroll
      for (unsigned int k = 0; k < 4u; ++k) {
        v[k] = make_uint4(0u, 0u, 0u, 0u);
        if (w + 32u * k < row_words) {
          if constexpr (kLdcv) {
            v[k] = __ldcv(s + w + 32u * k);  // volatile / uncached, as the queue kernel reads host memory
          } else {
            v[k] = s[w + 32u * k];
          }
        }
      }
#pragma unroll
      for (unsigned int k = 0; k < 4u; ++k) {
        if (w + 32u * k < row_words) d[w + 32u * k] = v[k];
      }
    }
  }
}

extern "C" __global__ void probe_copy(const uint4* src, uint4* dst, unsigned long long rows, unsigned int row_words) {
  copy_rows<false>(src, dst, rows, row_words);
}

extern "C" __global__ void probe_copy_ldcv(const uint4* src, uint4* dst, unsigned long long rows,
                                           unsigned int row_words) {
  copy_rows<true>(src, dst, rows, row_words);
}
