// score.cuh -- a float32 vector times the queue's weight matrix: the result is the n scores x @ W.
//
//   payload : x, k float32 values (4 k bytes, little-endian)
//   params  : W, float32 [k, n], row-major (QueueConfig(params=W) with W a C-ordered float32
//             numpy array of shape (k, n)); n = gpuq_params_bytes() / (4 k)
//   result  : the n float32 scores, score[j] = sum_i x[i] * W[i, j] (4 n bytes)
// The message fails (GPUQ_FAIL, gpuq_plugin_api.cuh; MessageFailed on the host) with, checked in
// this order:
//   1 SCORE_BAD_PAYLOAD  the payload is empty or len % 4 != 0
//   2 SCORE_BAD_PARAMS   no params, or params bytes % len != 0 (W has no whole rows of k values)
//   3 SCORE_TOO_LARGE    4 n > out_cap (the scores do not fit in a slot: raise slot_bytes)
// Python twin: gpuq_driver.plugins.score_twin (NumPy x @ W in float32).  The sums here are fused
// multiply-adds in row order i = 0 .. k-1; NumPy's BLAS adds in its own order, so the two agree to
// float32 rounding, not bit for bit.
//
// Plugin contract: see echo.cuh.  Warp-cooperative: lane l computes the outputs j = l, l + 32, ...
// (two at a time); for each row i the 32 lanes read 32 consecutive floats of W (coalesced 128-byte
// lines), 32 rows' weights loaded before they are used, and x comes in 32 values at a time, one
// per lane, broadcast with warp shuffles.
#pragma once

#define GPUQ_SCORE_BAD_PAYLOAD 1u
#define GPUQ_SCORE_BAD_PARAMS 2u
#define GPUQ_SCORE_TOO_LARGE 3u

__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)msg_id;
  if (len == 0u || (len & 3u) != 0u) return GPUQ_FAIL(GPUQ_SCORE_BAD_PAYLOAD);
  const uint64_t pbytes = gpuq_params_bytes();
  if (pbytes == 0u || pbytes % len != 0u) return GPUQ_FAIL(GPUQ_SCORE_BAD_PARAMS);
  const uint64_t n64 = pbytes / len;  // params bytes / (4 k)
  if (n64 > out_cap / 4u) return GPUQ_FAIL(GPUQ_SCORE_TOO_LARGE);
  const uint32_t k = len / 4u, n = static_cast<uint32_t>(n64);
  const float* __restrict__ x = reinterpret_cast<const float*>(in);
  const float* __restrict__ w = reinterpret_cast<const float*>(gpuq_params());
  float* o = reinterpret_cast<float*>(out);
  // 64 outputs per pass (lane l: j0 + l and j0 + 32 + l); per 32 rows, every weight is loaded
  // before the first multiply, so 64 loads per lane are in flight at once (one L2 round trip per 32
  // rows instead of one per row).
  for (uint32_t j0 = 0; j0 < n; j0 += 64u) {  // uniform across the warp: every lane shuffles
    const uint32_t ja = j0 + lane, jb = j0 + 32u + lane;
    const bool ma = ja < n, mb = jb < n;
    float acc_a = 0.0f, acc_b = 0.0f;
    for (uint32_t i0 = 0; i0 < k; i0 += 32u) {
      const float xl = i0 + lane < k ? x[i0 + lane] : 0.0f;
      const float* wr = w + static_cast<size_t>(i0) * n;
      if (k - i0 >= 32u) {
        float wa[32], wb[32];
#pragma unroll
        for (uint32_t t = 0; t < 32u; ++t) {
          wa[t] = ma ? __ldg(wr + static_cast<size_t>(t) * n + ja) : 0.0f;
          wb[t] = mb ? __ldg(wr + static_cast<size_t>(t) * n + jb) : 0.0f;
        }
#pragma unroll
        for (uint32_t t = 0; t < 32u; ++t) {
          const float xi = __shfl_sync(0xFFFFFFFFu, xl, t);
          acc_a = fmaf(xi, wa[t], acc_a);
          acc_b = fmaf(xi, wb[t], acc_b);
        }
      } else {  // the last k % 32 rows
        for (uint32_t t = 0; t < k - i0; ++t) {
          const float xi = __shfl_sync(0xFFFFFFFFu, xl, t);
          if (ma) acc_a = fmaf(xi, __ldg(wr + static_cast<size_t>(t) * n + ja), acc_a);
          if (mb) acc_b = fmaf(xi, __ldg(wr + static_cast<size_t>(t) * n + jb), acc_b);
        }
      }
    }
    if (ma) o[ja] = acc_a;
    if (mb) o[jb] = acc_b;
  }
  return 4u * n;
}
