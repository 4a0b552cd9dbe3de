// gpuq_queue.cu -- the persistent cooperative kernel that serves the queue, and its layout probe.
//
// One launch (a *lease*) serves the queue for up to GpuqKernelArgs.lease_ns, then leaves at a message
// boundary; the host launches the next lease on demand (gpuq_layout.cuh, "Leases").  Every warp
// of the grid is a worker:
//   1. lane 0 claims the next msg_id with atomicAdd on GpuqDevState.claim (VRAM);
//   2. it waits until the doorbell has passed that msg_id.  Only the "front" warp, the one whose
//      claim equals the last doorbell value seen, reads the host's doorbell over PCIe, so at most
//      one or two PCIe polls are outstanding however large the grid; the others wait on the VRAM
//      copy (GpuqDevState.head) with __nanosleep backoff.  The front warp is also the one that
//      ends the lease when its time is up;
//   3. the warp copies the payload from the host-mapped request slot into its VRAM slot, runs the
//      plugin's gpuq_process(), and publishes the result (data, fence, header, msg_id last); a
//      plugin's GPUQ_FAIL(code) is published as a failed result (gpuq_layout.cuh, result flags).
// gpuq_layout.cuh documents the memory placement and the one-writer rule.
#include "gpuq_layout.cuh"

#include "gpuq_sync.cuh"

#include "gpuq_plugin_api.cuh"

// The per-queue parameters the plugin reads (gpuq_plugin_api.cuh); set by the host before the
// first lease (kernel.py: cuModuleGetGlobal + a copy), never while a lease runs.
__device__ GpuqParams gpuq_params_g = {nullptr, 0u};

#ifndef GPUQ_PLUGIN_FILE
#define GPUQ_PLUGIN_FILE "plugins/echo.cuh"
#endif
#include GPUQ_PLUGIN_FILE

namespace {
using namespace gpuq;

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ void backoff(uint32_t& ns, uint32_t cap) {
  if (cap != 0u) __nanosleep(ns < cap ? ns : cap);
  if (ns < (1u << 20)) ns <<= 1;
}

// Record the first protocol error (VRAM CAS, then a plain store to the host-visible line).
__device__ void report_error(const GpuqKernelArgs& p, uint32_t code, uint64_t msg_id) {
  if (atomicCAS(&p.dev->error, 0u, code) == 0u) {
    p.ctrl_dev->error_msg_id = msg_id;
    __threadfence_system();
    store_release<kSys>(&p.ctrl_dev->error, code);
  }
}

// Make `head` visible to the other warps (release: the host's writes the front warp acquired
// through the doorbell come with it).
__device__ __forceinline__ void publish_head(GpuqDevState* dev, uint64_t head) {
  cuda::atomic_ref<uint64_t, kGpu>(dev->head).fetch_max(head, cuda::memory_order_release);
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The first front warp of a lease announces it: leases_begun, RUNNING, then a full system fence
// before its first doorbell read (the device half of the relaunch handshake, gpuq_layout.cuh).
__device__ void announce_lease(const GpuqKernelArgs& p) {
  GpuqDevState* dev = p.dev;
  dev->begun = 1u;
  dev->lease_start = globaltimer_ns();
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_begun) = dev->leases + 1u;
  store_release<kSys>(&p.ctrl_dev->state, GPUQ_KERNEL_RUNNING);
  cuda::atomic_thread_fence(cuda::memory_order_seq_cst, kSys);
}

// Lane 0 only: claim a msg_id and wait until it is published.  Returns GPUQ_NO_MSG to exit.
// When this warp was the front, `publish` is set to the head it read from the doorbell; the
// caller publishes it to the other warps (process_one does so while its own reads are in flight).
__device__ uint64_t claim_and_wait(const GpuqKernelArgs& p, uint64_t& publish) {
  GpuqDevState* dev = p.dev;
  const uint64_t s = atomicAdd(reinterpret_cast<unsigned long long*>(&dev->claim), 1ull);
  uint32_t ns = 32u;
  for (;;) {
    const uint32_t stop = load_acquire<kGpu>(&dev->stop);
    if (stop == GPUQ_STOP_ABORT) return GPUQ_NO_MSG;
    const uint64_t h = load_acquire<kGpu>(&dev->head);
    if (s < h) return s;
    if (stop != GPUQ_RUN) return GPUQ_NO_MSG;  // DRAIN or LEAVE: head was final before stop was set
    if (s == h) {
      // Front warp: only it advances dev->head, so it polls the host alone until its message
      // (or a stop) arrives: one acquire load of the doorbell per PCIe round trip.  Fronts follow
      // one another through head's release/acquire, so begun and lease_start are seen in order.
      const bool first = volatile_load(&dev->begun) == 0u;
      if (first) announce_lease(p);
      const uint64_t lease_start = volatile_load(&dev->lease_start);
      for (uint32_t polls = 0;; ++polls) {
        // The lease is over: one front warp (the first to see it, atomicExch on dev->leaving)
        // says so (leases_leaving, then a full system fence) and reads the doorbell one last
        // time; what that read shows is served in this lease, nothing after it (the device half
        // of the leaving handshake, gpuq_layout.cuh).  A warp that becomes front after it (its
        // claim is that final head) must not read again: it waits for the final head and stop.
        // Every lease reads the doorbell at least once before it may leave (its first front
        // skips the time check once).
        const bool over = !(first && polls == 0u) && globaltimer_ns() - lease_start >= p.lease_ns;
        bool leaving = false;
        if (over || volatile_load(&dev->leaving) != 0u) {
          if (atomicExch(&dev->leaving, 1u) != 0u) {
            uint32_t st;
            while ((st = load_acquire<kGpu>(&dev->stop)) == GPUQ_RUN) {
            }
            return st != GPUQ_STOP_ABORT && s < load_acquire<kGpu>(&dev->head) ? s : GPUQ_NO_MSG;
          }
          *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_leaving) = dev->leases + 1u;
          cuda::atomic_thread_fence(cuda::memory_order_seq_cst, kSys);
          leaving = true;
        }
        const uint64_t db = load_acquire<kSys>(&p.ctrl_host->doorbell);
        const uint64_t hh = db & GPUQ_DOORBELL_HEAD_MASK;
        const uint32_t hstop = static_cast<uint32_t>(db >> GPUQ_DOORBELL_STOP_SHIFT);
        if (hstop == GPUQ_STOP_ABORT) {  // no new head: only messages already handed out finish
          store_release<kGpu>(&dev->stop, hstop);
          return GPUQ_NO_MSG;
        }
        if (hstop != GPUQ_RUN || leaving) {  // DRAIN, or the last read of a lease: this head is final
          publish_head(dev, hh);
          store_release<kGpu>(&dev->stop, hstop != GPUQ_RUN ? hstop : GPUQ_STOP_LEAVE);
          return s < hh ? s : GPUQ_NO_MSG;
        }
        if (s < hh) {
          publish = hh;  // published by process_one, once its PCIe reads are in flight
          return s;
        }
        // Spin while traffic is recent (a poll is one PCIe round trip, ~1 us); back off once idle.
        if (polls > 1024u) backoff(ns, p.front_backoff_ns);
      }
    }
    // Not the front.  The next two in line spin on the VRAM copy of the doorbell, so one of
    // them takes over at once even if a sleeper wakes late; the others sleep with exponential
    // backoff (a sleeping warp that is late to become front would delay every later message).
    if (s - h > 2u) backoff(ns, p.idle_backoff_ns);
  }
}

__device__ void process_one(const GpuqKernelArgs& p, uint64_t s, uint32_t lane, uint64_t publish) {
  const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
  const size_t data_off = static_cast<size_t>(slot) * p.slot_bytes;
  const uint8_t* src = p.req_data + data_off;

  // One PCIe round trip for the header and the first 512 payload bytes: lane 0 reads the header
  // while every lane reads its 16 bytes of the slot (speculatively: the length is not known yet).
  const uint32_t first = lane * 16u;
  uint4 hdr = make_uint4(0u, 0u, 0u, 0u), chunk = make_uint4(0u, 0u, 0u, 0u);
  if (lane == 0) hdr = __ldcv(reinterpret_cast<const uint4*>(p.req_hdr + slot));
  if (first < p.slot_bytes) chunk = __ldcv(reinterpret_cast<const uint4*>(src + first));
  // The front warp hands over to the next warp now: the release waits for these reads anyway.
  if (lane == 0 && publish != 0) publish_head(p.dev, publish);
  uint32_t len = hdr.x, code = GPUQ_ERR_NONE;
  // [enqueue_device] the request flags: GPUQ_REQ_IN_VRAM = the payload is in the VRAM slot already.
  const bool in_vram = (__shfl_sync(kFullMask, hdr.y, 0) & GPUQ_REQ_IN_VRAM) != 0u;
  if (lane == 0) {
    const uint64_t mid = static_cast<uint64_t>(hdr.z) | (static_cast<uint64_t>(hdr.w) << 32);
    if (mid != s) code = GPUQ_ERR_BAD_MSG_ID;
    if (len > p.slot_bytes) { code = GPUQ_ERR_BAD_LEN; len = p.slot_bytes; }
    if (code != GPUQ_ERR_NONE) report_error(p, code, s);
  }
  len = __shfl_sync(kFullMask, len, 0);
  code = __shfl_sync(kFullMask, code, 0);

  // READY -> INFLIGHT: stage the payload in the message's VRAM slot; the rest of a long payload
  // with four 16-byte loads in flight per lane (2 KB per round trip).
  uint8_t* vslot = p.vram_slots + static_cast<size_t>(slot) * (16u + p.slot_bytes);
  uint8_t* vin = vslot + 16;
  // [enqueue_device] an in-VRAM payload is not copied (both the first chunk and the rest are
  // skipped); the acquire of the head in claim_and_wait orders the host's completed D2D copy first.
  if (!in_vram && first < len) *reinterpret_cast<uint4*>(vin + first) = chunk;
  for (uint32_t base = 512u + first; !in_vram && base < len; base += 4u * 512u) {
    uint4 v[4];
#pragma unroll
    for (uint32_t k = 0; k < 4u; ++k) {
      if (base + k * 512u < len) v[k] = __ldcv(reinterpret_cast<const uint4*>(src + base + k * 512u));
    }
#pragma unroll
    for (uint32_t k = 0; k < 4u; ++k) {
      if (base + k * 512u < len) *reinterpret_cast<uint4*>(vin + base + k * 512u) = v[k];
    }
  }
  GpuqSlotHeader* vh = reinterpret_cast<GpuqSlotHeader*>(vslot);
  if (lane == 0) { vh->len = len; vh->flags = GPUQ_INFLIGHT; vh->msg_id = s; }
  __syncwarp();

  uint32_t out_len = 0, status = 0;
  if (code == GPUQ_ERR_NONE) {
    out_len = gpuq_process(vin, len, p.res_data + data_off, p.slot_bytes, s, lane);
    if (out_len >= GPUQ_FAIL_BIT) {  // the plugin failed the message: a status, not a protocol error
      status = GPUQ_RESULT_FAILED | ((out_len & 0xFFFFu) << GPUQ_FAIL_CODE_SHIFT);
      out_len = 0;
    } else if (out_len > p.slot_bytes) {
      if (lane == 0) report_error(p, GPUQ_ERR_BAD_RESULT, s);
      code = GPUQ_ERR_BAD_RESULT;
      out_len = 0;
    }
  }

  // INFLIGHT -> DONE: the warp's result writes are ordered before lane 0's release (the warp
  // barrier orders them, the system-scope release is cumulative); header, then msg_id last.
  __syncwarp();
  if (lane == 0) {
    GpuqSlotHeader* oh = p.res_hdr + slot;
    const uint64_t len_flags = static_cast<uint64_t>(out_len) |
                               (static_cast<uint64_t>(GPUQ_DONE | (code << GPUQ_ERR_SHIFT) | status) << 32);
    *reinterpret_cast<volatile uint64_t*>(oh) = len_flags;
    store_release<kSys>(&oh->msg_id, s);
    vh->flags = GPUQ_DONE;
  }
}

// The last warp out of a lease: every other warp has left, so it alone resets the device state for
// the next lease (claims abandoned at or above the head are handed out again), then reports the
// end: leases_ended, and state PARKED (on time) or EXITED (the host asked to stop).
__device__ void end_lease(const GpuqKernelArgs& p) {
  GpuqDevState* dev = p.dev;
  const uint32_t stop = dev->stop;
  const uint64_t ended = dev->leases + 1u;
  dev->claim = dev->head;
  dev->stop = GPUQ_RUN;
  dev->leaving = 0u;
  dev->exited = 0u;
  dev->begun = 0u;
  dev->leases = ended;
  __threadfence();
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_leaving) = ended;  // also after DRAIN/ABORT
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_ended) = ended;
  __threadfence_system();
  const bool host_stop = stop == GPUQ_STOP_DRAIN || stop == GPUQ_STOP_ABORT;
  store_release<kSys>(&p.ctrl_dev->state, host_stop ? GPUQ_KERNEL_EXITED : GPUQ_KERNEL_PARKED);
}

}  // namespace

extern "C" __global__ void gpuq_persistent(const GpuqKernelArgs p) {
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const uint32_t warps = (gridDim.x * blockDim.x) >> 5;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.ctrl_dev->layout_version = GPUQ_LAYOUT_VERSION;
    p.ctrl_dev->warps = warps;
  }
  uint64_t processed = p.warp_totals[warp];  // carried over from the previous lease
  for (;;) {
    uint64_t s = 0, publish = 0;
    if (lane == 0) s = claim_and_wait(p, publish);
    s = __shfl_sync(kFullMask, s, 0);
    __syncwarp();  // orders lane 0's acquire before every lane's reads of the slot
    if (s == GPUQ_NO_MSG) break;
    process_one(p, s, lane, publish);
    ++processed;
    if (lane == 0) *reinterpret_cast<volatile uint64_t*>(p.warp_counters + warp) = processed;
  }
  if (lane == 0) {
    p.warp_totals[warp] = processed;
    __threadfence_system();
    const uint32_t gone = atomicAdd(&p.dev->exited, 1u) + 1u;
    if (gone == warps) {
      __threadfence();  // acquire side of the other warps' exits
      end_lease(p);
    }
  }
}

// offsetof without <cstddef> or __builtin_offsetof (which NVRTC 13.0 rejects for these structs).
#define GPUQ_OFFSETOF(T, m) (reinterpret_cast<size_t>(&reinterpret_cast<const T*>(0)->m))

// Writes sizeof/offsetof of every shared struct, in the order gpuq_driver/layout.py expects.
extern "C" __global__ void gpuq_layout_probe(uint64_t* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const uint64_t v[] = {
      GPUQ_LAYOUT_VERSION,
      sizeof(GpuqSlotHeader), GPUQ_OFFSETOF(GpuqSlotHeader, len),
      GPUQ_OFFSETOF(GpuqSlotHeader, flags), GPUQ_OFFSETOF(GpuqSlotHeader, msg_id),
      sizeof(GpuqCtrlHost), GPUQ_OFFSETOF(GpuqCtrlHost, doorbell),
      sizeof(GpuqCtrlDev), GPUQ_OFFSETOF(GpuqCtrlDev, state),
      GPUQ_OFFSETOF(GpuqCtrlDev, error), GPUQ_OFFSETOF(GpuqCtrlDev, error_msg_id),
      GPUQ_OFFSETOF(GpuqCtrlDev, layout_version), GPUQ_OFFSETOF(GpuqCtrlDev, warps),
      GPUQ_OFFSETOF(GpuqCtrlDev, leases_begun), GPUQ_OFFSETOF(GpuqCtrlDev, leases_ended),
      GPUQ_OFFSETOF(GpuqCtrlDev, leases_leaving),
      sizeof(GpuqDevState), sizeof(GpuqKernelArgs), GPUQ_OFFSETOF(GpuqKernelArgs, warp_totals),
      GPUQ_OFFSETOF(GpuqKernelArgs, lease_ns), GPUQ_OFFSETOF(GpuqKernelArgs, capacity), GPUQ_OFFSETOF(GpuqKernelArgs, slot_bytes),
      GPUQ_OFFSETOF(GpuqKernelArgs, front_backoff_ns), GPUQ_OFFSETOF(GpuqKernelArgs, idle_backoff_ns),
  };
  for (unsigned i = 0; i < sizeof(v) / sizeof(v[0]); ++i) out[i] = v[i];
}
