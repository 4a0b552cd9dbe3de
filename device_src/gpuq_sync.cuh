// gpuq_sync.cuh -- acquire/release loads and stores for the queue's protocol (libcu++ atomic_ref).
// System scope for host-mapped memory (the host is the other party), device scope for VRAM.
// Only loads and stores: no read-modify-write ever touches host-mapped memory.
#pragma once
#include <cuda/atomic>

namespace gpuq {
template <class T>
__device__ __forceinline__ T load_acquire_sys(T* p) {
  return cuda::atomic_ref<T, cuda::thread_scope_system>(*p).load(cuda::memory_order_acquire);
}
template <class T>
__device__ __forceinline__ void store_release_sys(T* p, T v) {
  cuda::atomic_ref<T, cuda::thread_scope_system>(*p).store(v, cuda::memory_order_release);
}
template <class T>
__device__ __forceinline__ T load_acquire_dev(T* p) {
  return cuda::atomic_ref<T, cuda::thread_scope_device>(*p).load(cuda::memory_order_acquire);
}
template <class T>
__device__ __forceinline__ void store_release_dev(T* p, T v) {
  cuda::atomic_ref<T, cuda::thread_scope_device>(*p).store(v, cuda::memory_order_release);
}
}  // namespace gpuq
