// gpuq_sync.cuh -- acquire/release loads and stores for the queue's protocol (libcu++ atomic_ref).
// System scope for host-mapped memory (the host is the other party), device scope for VRAM.
// Only loads and stores: no read-modify-write ever touches host-mapped memory.
#pragma once
#include <cuda/atomic>

namespace gpuq {

constexpr cuda::thread_scope kSys = cuda::thread_scope_system;  // host-mapped memory
constexpr cuda::thread_scope kGpu = cuda::thread_scope_device;  // VRAM

template <cuda::thread_scope Scope, class T>
__device__ __forceinline__ T load_acquire(T* p) {
  return cuda::atomic_ref<T, Scope>(*p).load(cuda::memory_order_acquire);
}

template <cuda::thread_scope Scope, class T>
__device__ __forceinline__ void store_release(T* p, T v) {
  cuda::atomic_ref<T, Scope>(*p).store(v, cuda::memory_order_release);
}

// A load that is not cached in a register across iterations (VRAM scalars ordered by other means).
template <class T>
__device__ __forceinline__ T volatile_load(const T* p) {
  return *reinterpret_cast<const volatile T*>(p);
}

}  // namespace gpuq
