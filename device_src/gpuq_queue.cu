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

#include "gpuq_crc.cuh"

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

// GPUQ_TRACE (a diagnostic build, benchmarks/probe_poll.py --trace): lane 0 of the warp serving a
// message stamps clock64() at the poll that found it (issued, returned), once its payload is in
// hand, after the plugin and after the result's release, into GpuqCtrlDev.pad[0 .. 6] (with the msg_id
// and the polls it took), for the host to read.
#ifdef GPUQ_TRACE
__device__ unsigned long long gpuq_trace_g[8];
#define GPUQ_TRACE_AT(i) (gpuq_trace_g[i] = clock64())
#else
#define GPUQ_TRACE_AT(i) ((void)0)
#endif

// The lanes of the front warp's poll (one round trip): lane 0 the doorbell, lane 1 slot s's
// header, lanes 16 .. 31 its first 64 payload bytes, one 32-bit word each (one coalesced 64-byte
// read; four loads of one line from a single thread measured 2.6 us slower per poll on the H200,
// benchmarks/NOTES.md), so that each lane checks its own word (warp_crc32) and stages it.
constexpr uint32_t kHdrLane = 1u, kWordLane = 16u;

// The header lane 1 read may be message s's, checked by the host, and the whole payload was read
// with it (at most 64 bytes: a longer one waits for the doorbell, since reading its rest after the
// check would need a system-scope acquire fence, measured ~2 us): worth validating (process_one).
__device__ __forceinline__ bool slot_candidate(const GpuqKernelArgs& p, const uint4& hdr, uint64_t s) {
  const uint64_t mid = static_cast<uint64_t>(hdr.z) | (static_cast<uint64_t>(hdr.w) << 32);
  return mid == s && (hdr.y & GPUQ_REQ_CHECKED) != 0u && hdr.x <= GPUQ_CHECK_BYTES && hdr.x <= p.slot_bytes;
}

__device__ __forceinline__ uint4 shfl4(uint4 v, uint32_t src) {
  return make_uint4(__shfl_sync(kFullMask, v.x, src), __shfl_sync(kFullMask, v.y, src),
                    __shfl_sync(kFullMask, v.z, src), __shfl_sync(kFullMask, v.w, src));
}

// Scouts (GpuqKernelArgs.scouts, one_read only; docs/design.md, "Scouts").  The front warp's polls
// come back to back, one round trip apart, so a new message waits half a round trip on average for
// the next one to leave; K scout warps poll the same slot (not the doorbell) at fixed phases between
// the front's polls, so that it waits a (K + 1)-th of that.  Whoever sees the message first serves
// it, after a bid: the front announces the msg_id it polls for (GpuqDevState.front), and the front
// and the scouts bid for that message with atomicMax on GpuqDevState.grab.  Fronts follow one
// another in msg_id order, and each bids before the head passes its message (its own release of
// the head, or the winning scout's, comes after the bid), so the bids for announced messages come
// in msg_id order and the first bid for s (the one that returns <= s) wins s; a warp that bids
// late, or sees grab > s, has lost.  A message that no front announced is never bid for.
// Returns the previous value of grab.
__device__ __forceinline__ uint64_t bid(GpuqDevState* dev, uint64_t s) {
  return atomicMax(reinterpret_cast<unsigned long long*>(&dev->grab), static_cast<unsigned long long>(s + 1u));
}

// wait_for's return when a scout took the message this warp waited for: its claim is spent.
constexpr uint64_t kLost = GPUQ_NO_MSG - 1u;

// The whole warp: wait until msg_id s (claimed by this warp) is published.  Returns s, kLost (a
// scout served s) or GPUQ_NO_MSG to exit (the same in every lane).  Lane 0 runs the protocol; the
// other lanes join the front warp's polls.  When this warp was the front, lane 0's `publish` is set
// to the head it read from the doorbell (process_one publishes it to the other warps while its own
// reads are in flight), `cand` (every lane) says whether `mine` (lanes 1, 16 .. 31) holds a read of
// slot s to validate ("One read", gpuq_layout.cuh): then s may be returned before the doorbell
// shows it, and with scouts lane 0's `gold` is what its bid for s returned (process_one serves s
// only if it is <= s; 0 when there was no bid).  `own`: this warp won s already (its read of s was
// torn): it polls again without bidding.
__device__ uint64_t wait_for(const GpuqKernelArgs& p, uint64_t s, uint32_t lane, bool own, uint64_t& publish,
                             uint4& mine, bool& cand, uint64_t& gold) {
  GpuqDevState* dev = p.dev;
  uint32_t ns = 32u;
  uint64_t ret = 0;
  uint32_t front = 0u;
  if (lane == 0) {
    for (;;) {  // not the front: wait on the VRAM copy of the doorbell
      const uint32_t stop = load_acquire<kGpu>(&dev->stop);
      if (stop == GPUQ_STOP_ABORT) { ret = GPUQ_NO_MSG; break; }
      const uint64_t h = load_acquire<kGpu>(&dev->head);
      if (s < h) { ret = s; break; }
      if (stop != GPUQ_RUN) { ret = GPUQ_NO_MSG; break; }  // DRAIN or LEAVE: head was final before stop
      if (s == h) { front = 1u; break; }
      // The next two in line spin on the VRAM copy of the doorbell, so one of them takes over at
      // once even if a sleeper wakes late; the others sleep with exponential backoff (a sleeping
      // warp that is late to become front would delay every later message).
      if (s - h > 2u) backoff(ns, p.idle_backoff_ns);
    }
  }
  if (__shfl_sync(kFullMask, front, 0) == 0u) return __shfl_sync(kFullMask, ret, 0);

  // Front warp: only it advances dev->head, so it polls the host alone until its message (or a
  // stop) arrives: one round trip per poll for the doorbell and slot s.  Fronts follow one another
  // through head's release/acquire, so begun and lease_start are seen in order.
  const bool scouted = p.scouts != 0u && !own;  // scouts may take s: bid before serving or leaving it
  bool need_bid = scouted;  // lane 0: not bid yet (a bid returns gold: this warp has s if gold <= s)
  bool first = false;
  uint64_t lease_start = 0, prev_t = 0;
  if (lane == 0) {
    first = volatile_load(&dev->begun) == 0u;
    if (first) announce_lease(p);
    lease_start = volatile_load(&dev->lease_start);
    if (p.scouts != 0u) *reinterpret_cast<volatile uint64_t*>(&dev->front) = s + 1u;
    if (p.one_read != 0u) *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->front) = s;  // the host's hint
  }
  const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
  const uint4* shdr = reinterpret_cast<const uint4*>(p.req_hdr + slot);
  const uint32_t* sword = reinterpret_cast<const uint32_t*>(p.req_data + static_cast<size_t>(slot) * p.slot_bytes);
  const uint32_t words = p.slot_bytes / 4u < 16u ? p.slot_bytes / 4u : 16u;
  // Read the slot in the polls only while the last message served was checked (gpuq_layout.cuh,
  // "One read"); every lane reads the hint, again at each poll for the next one.
#ifdef GPUQ_POLL_HINT_OFF  // a diagnostic (benchmarks): the slot in every poll, as before the hint
  constexpr bool kHint = false;
#else
  constexpr bool kHint = true;
#endif
  bool spoll = p.one_read != 0u && (!kHint || volatile_load(&dev->unchecked) == 0u);
  ns = 32u;
  for (uint32_t polls = 0;; ++polls) {
    // the hint for the next poll (its latency hides under this one's round trip); none without the one read
    const uint32_t unchecked = p.one_read != 0u ? volatile_load(&dev->unchecked) : 1u;
    // One round trip: the slot's header and first 64 bytes (lanes 1, 16 .. 31, where the queue uses the
    // one read: reading them costs ~0.4 us a poll) beside the doorbell (lane 0).  The lease's VRAM
    // flag, the bids (with scouts) and the clock are read first, so that their latency hides under
    // the round trip.
    uint32_t lv = 0u;
    uint64_t now = 0, g = 0;
    if (lane == 0) {
      lv = volatile_load(&dev->leaving);
      if (scouted) g = volatile_load(&dev->grab);
      now = globaltimer_ns();
    }
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    uint64_t db = 0;
#ifdef GPUQ_TRACE
    const unsigned long long t_issue = clock64();
    const uint64_t g_issue = now;
#endif
    if (spoll) {
      if (lane == kHdrLane) v = __ldcv(shdr);
      else if (lane >= kWordLane && lane - kWordLane < words) v.x = __ldcv(sword + (lane - kWordLane));
    }
    if (lane == 0) {
      if (p.scouts != 0u) {  // the scouts keep their phase from these (scout_loop)
        if (prev_t != 0u) *reinterpret_cast<volatile uint64_t*>(&dev->poll_per) = now - prev_t;
        *reinterpret_cast<volatile uint64_t*>(&dev->poll_t) = now;
        prev_t = now;
      }
      db = load_acquire<kSys>(&p.ctrl_host->doorbell);
    }
    // The lease is over: one front warp (the first to see it, atomicExch on dev->leaving) says so
    // (leases_leaving, then a full system fence) and reads the doorbell one last time (alone: the
    // poll above is dropped); what that read shows is served in this lease, nothing after it (the
    // device half of the leaving handshake, gpuq_layout.cuh).  A warp that becomes front after it
    // (its claim is that final head) must not read again: it waits for the final head and stop.
    // Every lease reads the doorbell at least once before it may leave (its first front skips the
    // time check once).  A scout that took s ends the wait at once (kLost).
    uint32_t act = 0u;  // 0: the poll, 1: the lease's last read, 2: return ret
    if (lane == 0) {
      const bool over = !(first && polls == 0u) && now - lease_start >= p.lease_ns;
      if (g > s) {
        ret = kLost;
        act = 2u;
      } else if (over || lv != 0u) {
        // With scouts, a front whose message a scout took is still polling until it learns so, and
        // such a stale front must not act for the lease: bid first (bid()).
        if (need_bid) { gold = bid(dev, s); need_bid = false; }
        if (gold > s) {
          ret = kLost;
          act = 2u;
        } else if (atomicExch(&dev->leaving, 1u) != 0u) {
          uint32_t st;
          while ((st = load_acquire<kGpu>(&dev->stop)) == GPUQ_RUN) {
          }
          ret = st != GPUQ_STOP_ABORT && s < load_acquire<kGpu>(&dev->head) ? s : GPUQ_NO_MSG;
          act = 2u;
        } else {
          *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_leaving) = dev->leases + 1u;
          cuda::atomic_thread_fence(cuda::memory_order_seq_cst, kSys);
          db = load_acquire<kSys>(&p.ctrl_host->doorbell);
          act = 1u;
        }
      }
    }
    act = __shfl_sync(kFullMask, act, 0);
    if (act == 2u) return __shfl_sync(kFullMask, ret, 0);
    const bool leaving = act == 1u;
    const uint4 hdr = shfl4(v, kHdrLane);
    uint32_t decide = 0u;  // 0: poll again, 1: return ret
    bool c = false;
    if (lane == 0) {
      const uint64_t hh = db & GPUQ_DOORBELL_HEAD_MASK;
      const uint32_t hstop = static_cast<uint32_t>(db >> GPUQ_DOORBELL_STOP_SHIFT);
      decide = 1u;
      if (hstop != GPUQ_RUN || leaving) {  // a stop, or the last read of a lease: bid first (above)
        if (need_bid) { gold = bid(dev, s); need_bid = false; }
        if (gold > s) {
          ret = kLost;
        } else if (hstop == GPUQ_STOP_ABORT) {  // no new head: only messages already handed out finish
          store_release<kGpu>(&dev->stop, hstop);
          ret = GPUQ_NO_MSG;
        } else {  // DRAIN, or the last read of a lease: this head is final
          publish_head(dev, hh);
          store_release<kGpu>(&dev->stop, hstop != GPUQ_RUN ? hstop : GPUQ_STOP_LEAVE);
          ret = s < hh ? s : GPUQ_NO_MSG;
        }
      } else {
        c = slot_candidate(p, hdr, s);
        if (s < hh || c) {
          publish = hh;  // published by process_one once it may serve s (s + 1 at least, once a slot read holds)
          ret = s;
          if (need_bid) gold = bid(dev, s);  // its latency hides under the check or the slot's read
        } else {
          decide = 0u;
          // Spin while traffic is recent (a poll is one PCIe round trip, ~1 us); back off once idle.
          if (polls > 1024u) backoff(ns, p.front_backoff_ns);
        }
      }
    }
    if (__shfl_sync(kFullMask, decide, 0) != 0u) {
#ifdef GPUQ_TRACE
      if (lane == 0) { gpuq_trace_g[0] = t_issue; GPUQ_TRACE_AT(1); gpuq_trace_g[6] = polls; gpuq_trace_g[7] = g_issue; }
#endif
      cand = __shfl_sync(kFullMask, c ? 1u : 0u, 0) != 0u;
      mine = v;
      return __shfl_sync(kFullMask, ret, 0);
    }
    spoll = p.one_read != 0u && (!kHint || unchecked == 0u);
  }
}

// The CRC table of the one read's check (gpuq_crc.cuh, 8 KB), copied into shared memory by each
// block at the start of a lease of a queue that uses the one read.
__shared__ uint32_t crc_smem[2048];

// zlib.crc32(bytes[0 : n], seed) for n <= 64, in the lanes kWordLane .. 31 (the others return
// garbage).  Lane kWordLane + k holds the little-endian word k of the bytes in `word` (k >= 16:
// none).  The CRC register is linear in the message's bits, so each lane looks up the part of
// each of its 8 nibbles, at its distance from the end (gpuq_crc.cuh), side by side, and the
// half-warp XORs them (4 shuffles); the initial register ~seed acts as if XORed into the first 4
// bytes, and for n < 4 what of it was not shifted out stays.  Python model: tests/test_layout.py.
__device__ __forceinline__ uint32_t warp_crc32(uint32_t word, uint32_t k, uint32_t n, uint32_t seed) {
  const uint32_t c0 = ~seed;
  if (k == 0u) word ^= n >= 4u ? c0 : c0 & ((1u << (8u * n)) - 1u);
  // Branch-free, so that the 8 loads issue back to back: every lane looks up (in bounds: & 2047),
  // and keeps what belongs to a byte of the message.
  uint32_t part[8];
#pragma unroll
  for (uint32_t q = 0; q < 8u; ++q) {
    const uint32_t j = 4u * k + (q >> 1);  // the nibble's byte
    part[q] = crc_smem[(((n - 1u - j) * 2u + (q & 1u)) * 16u + ((word >> (4u * q)) & 15u)) & 2047u];
  }
  uint32_t acc = 0u;
#pragma unroll
  for (uint32_t q = 0; q < 8u; ++q) acc ^= 4u * k + (q >> 1) < n ? part[q] : 0u;
  acc ^= __shfl_xor_sync(kFullMask, acc, 8);
  acc ^= __shfl_xor_sync(kFullMask, acc, 4);
  acc ^= __shfl_xor_sync(kFullMask, acc, 2);
  acc ^= __shfl_xor_sync(kFullMask, acc, 1);
  if (n < 4u) acc ^= c0 >> (8u * n);
  return ~acc;
}

// The rest of a payload, bytes [from, len), into its VRAM slot: four 16-byte loads in flight per
// lane (2 KB per round trip; eight measured 1 % faster at 4 KB for 3 more registers a thread,
// benchmarks/NOTES.md).  `from` is a multiple of 16.
__device__ __forceinline__ void stage_rest(const uint8_t* src, uint8_t* vin, uint32_t from, uint32_t len,
                                           uint32_t lane) {
  constexpr uint32_t kDepth = 4u;
  for (uint32_t base = from + lane * 16u; base < len; base += kDepth * 512u) {
    uint4 v[kDepth];
#pragma unroll
    for (uint32_t k = 0; k < kDepth; ++k) {
      if (base + k * 512u < len) v[k] = __ldcv(reinterpret_cast<const uint4*>(src + base + k * 512u));
    }
#pragma unroll
    for (uint32_t k = 0; k < kDepth; ++k) {
      if (base + k * 512u < len) *reinterpret_cast<uint4*>(vin + base + k * 512u) = v[k];
    }
  }
}

// Run the plugin on a staged message (the whole warp) and write its result and the result
// header's first word (len | flags); the caller publishes msg_id (after a system fence).
__device__ __forceinline__ void run_plugin(const GpuqKernelArgs& p, uint64_t s, uint32_t slot, uint8_t* vslot,
                                           uint32_t len, uint32_t code, uint32_t lane) {
  uint8_t* vin = vslot + 16;
  GpuqSlotHeader* vh = reinterpret_cast<GpuqSlotHeader*>(vslot);
  if (lane == 0) { vh->len = len; vh->flags = GPUQ_INFLIGHT; vh->msg_id = s; }
  __syncwarp();
  uint32_t out_len = 0, status = 0;
  if (code == GPUQ_ERR_NONE) {
    out_len = gpuq_process(vin, len, p.res_data + static_cast<size_t>(slot) * p.slot_bytes, p.slot_bytes, s, lane);
    if (out_len >= GPUQ_FAIL_BIT) {  // the plugin failed the message: a status, not a protocol error
      status = GPUQ_RESULT_FAILED | ((out_len & 0xFFFFu) << GPUQ_FAIL_CODE_SHIFT);
      out_len = 0;
    } else if (out_len > p.slot_bytes) {
      if (lane == 0) report_error(p, GPUQ_ERR_BAD_RESULT, s);
      code = GPUQ_ERR_BAD_RESULT;
      out_len = 0;
    }
  }
  __syncwarp();
  if (lane == 0) {
    const uint64_t len_flags = static_cast<uint64_t>(out_len) |
                               (static_cast<uint64_t>(GPUQ_DONE | (code << GPUQ_ERR_SHIFT) | status) << 32);
    *reinterpret_cast<volatile uint64_t*>(p.res_hdr + slot) = len_flags;
  }
}

__device__ __forceinline__ void trace_out(const GpuqKernelArgs& p, uint64_t s) {
#ifdef GPUQ_TRACE
  GPUQ_TRACE_AT(4);
  volatile uint64_t* out = p.ctrl_dev->pad;
  for (int i = 0; i < 5; ++i) out[i] = gpuq_trace_g[i];
  // polls (scouts: 1 << 32 | scout) in the low 40 bits, ns from the poll's issue to the release
  // (the SM clock) in the high 24
  out[6] = (gpuq_trace_g[6] & 0xFFFFFFFFFFull) | ((globaltimer_ns() - gpuq_trace_g[7]) << 40);
  out[5] = s;
#endif
}

// Check a request header (lane 0 of the message): BAD_MSG_ID, BAD_LEN (len clamped).
__device__ __forceinline__ uint32_t check_request(const GpuqKernelArgs& p, const uint4& hdr, uint64_t s, uint32_t& len) {
  const uint64_t mid = static_cast<uint64_t>(hdr.z) | (static_cast<uint64_t>(hdr.w) << 32);
  uint32_t code = GPUQ_ERR_NONE;
  len = hdr.x;
  if (mid != s) code = GPUQ_ERR_BAD_MSG_ID;
  if (len > p.slot_bytes) { code = GPUQ_ERR_BAD_LEN; len = p.slot_bytes; }
  if (code != GPUQ_ERR_NONE) report_error(p, code, s);
  return code;
}

// The plugin on a staged message, then INFLIGHT -> DONE: the warp's result writes are ordered
// before lane 0's release (the warp barrier orders them, the system-scope release is cumulative);
// header, then msg_id last.
__device__ __forceinline__ void finish_one(const GpuqKernelArgs& p, uint64_t s, uint32_t slot, uint8_t* vslot,
                                           uint32_t len, uint32_t code, uint32_t lane) {
  run_plugin(p, s, slot, vslot, len, code, lane);
  if (lane == 0) GPUQ_TRACE_AT(3);
  __syncwarp();
  if (lane == 0) {
    store_release<kSys>(&p.res_hdr[slot].msg_id, s);
    trace_out(p, s);
    reinterpret_cast<GpuqSlotHeader*>(vslot)->flags = GPUQ_DONE;
  }
}

// Whether the one read of message s holds (every lane): lane 1 holds the header (its msg_id is s and
// it is a candidate: slot_candidate), lanes 16 .. 31 the first 64 bytes; the check is recomputed over
// the `len` bytes read, seeded with s ^ len << 24 (gpuq_layout.cuh, "One read").
__device__ __forceinline__ bool read_holds(const uint4& mine, uint64_t s, uint32_t lane) {
  const uint32_t len = __shfl_sync(kFullMask, mine.x, kHdrLane);  // <= 64 (slot_candidate)
  const uint32_t flags = __shfl_sync(kFullMask, mine.y, kHdrLane);
  const uint32_t k = lane >= kWordLane ? lane - kWordLane : 16u;  // the word this lane holds
#ifdef GPUQ_SPEC_NO_CHECK  // a diagnostic only (probe_poll.py): what the check costs; not a valid protocol
  (void)len; (void)flags; (void)k; (void)s;
  return true;
#else
  const uint32_t crc = warp_crc32(mine.x, k, len, static_cast<uint32_t>(s) ^ (len << 24));
  const uint32_t ok = (crc >> GPUQ_CHECK_SHIFT) == (flags >> GPUQ_CHECK_SHIFT) ? 1u : 0u;
  return __shfl_sync(kFullMask, ok, kWordLane) != 0u;
#endif
}

// Serve s from a one read that holds (the header's msg_id and len and the first len bytes are the
// host's).  The head the doorbell showed (`shown`), if it covers more than s, is released (its slots'
// writes come with the doorbell's acquire); else s + 1, relaxed: slot s is this warp's, and with
// scouts this warp's bid for s has returned before this store issues (bid()).  A release here
// measured ~600 SM cycles more per message (benchmarks/NOTES.md).
__device__ __forceinline__ void serve_read(const GpuqKernelArgs& p, uint64_t s, uint32_t lane, const uint4& mine,
                                           uint64_t shown) {
  const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
  uint8_t* vslot = p.vram_slots + static_cast<size_t>(slot) * (16u + p.slot_bytes);
  const uint32_t len = __shfl_sync(kFullMask, mine.x, kHdrLane);
  const uint32_t k = lane >= kWordLane ? lane - kWordLane : 16u;
  if (lane == 0) {
    GPUQ_TRACE_AT(2);
    *reinterpret_cast<volatile uint32_t*>(&p.dev->unchecked) = 0u;  // the polls' hint (wait_for)
    if (shown > s + 1u) {
      publish_head(p.dev, shown);
    } else {
      cuda::atomic_ref<uint64_t, kGpu>(p.dev->head).fetch_max(s + 1u, cuda::memory_order_relaxed);
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(&p.dev->spec_reads), 1ull);
  }
  if (4u * k < len) *reinterpret_cast<uint32_t*>(vslot + 16 + 4u * k) = mine.x;
  finish_one(p, s, slot, vslot, len, GPUQ_ERR_NONE, lane);
}

// Serve s from the slot (the doorbell or the VRAM head has shown it, so its writes are visible): one
// PCIe round trip for the header and the first 512 payload bytes: lane 0 reads the header while
// every lane reads its 16 bytes of the slot (speculatively: the length is not known yet).  `won`
// (lane 0) says whether this warp may serve s (its bid, if any, returned <= s): false returns false
// and publishes nothing; else a front publishes the head it read (`publish`, 0: none).
__device__ __forceinline__ bool serve_slot(const GpuqKernelArgs& p, uint64_t s, uint32_t lane, uint64_t publish,
                                           bool won) {
  const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
  const uint8_t* src = p.req_data + static_cast<size_t>(slot) * p.slot_bytes;
  uint8_t* vslot = p.vram_slots + static_cast<size_t>(slot) * (16u + p.slot_bytes);
  uint8_t* vin = vslot + 16;
  const uint32_t first = lane * 16u;
  uint4 hdr = make_uint4(0u, 0u, 0u, 0u), chunk = make_uint4(0u, 0u, 0u, 0u);
  if (lane == 0) hdr = __ldcv(reinterpret_cast<const uint4*>(p.req_hdr + slot));
  if (first < p.slot_bytes) chunk = __ldcv(reinterpret_cast<const uint4*>(src + first));
  // A front that lost its bid publishes nothing (it may read the doorbell after the lease's last
  // read, bid()).  The front warp hands over to the next warp now: the release waits for these
  // reads anyway.
  if (__shfl_sync(kFullMask, won ? 1u : 0u, 0) == 0u) return false;  // a scout has s
  if (lane == 0) {
    // The polls' hint for the next message, before the head's release, which waits for this
    // header's read anyway.
    if (p.one_read != 0u)
      *reinterpret_cast<volatile uint32_t*>(&p.dev->unchecked) = (hdr.y & GPUQ_REQ_CHECKED) != 0u ? 0u : 1u;
    if (publish != 0) publish_head(p.dev, publish);
  }
  uint32_t len = 0, code = GPUQ_ERR_NONE;
  if (lane == 0) code = check_request(p, hdr, s, len);
  if (lane == 0) GPUQ_TRACE_AT(2);
  len = __shfl_sync(kFullMask, len, 0);
  code = __shfl_sync(kFullMask, code, 0);
  // GPUQ_REQ_IN_VRAM (enqueue_device): the payload is in the VRAM slot already, copied device to
  // device before the host wrote the header (the head's acquire orders that copy first).
  const bool in_vram = (__shfl_sync(kFullMask, hdr.y, 0) & GPUQ_REQ_IN_VRAM) != 0u;

  // READY -> INFLIGHT: stage the payload in the message's VRAM slot.
  if (!in_vram) {
    if (first < len) *reinterpret_cast<uint4*>(vin + first) = chunk;
    stage_rest(src, vin, 512u, len, lane);
  }
  finish_one(p, s, slot, vslot, len, code, lane);
  return true;
}

// process_one's outcomes.
constexpr uint32_t kRetry = 0u, kServed = 1u, kGone = 2u;  // kGone: a scout won s (this warp's claim is spent)

// One message, the whole warp.  `cand`: `mine` (lanes 1, 16 .. 31) holds the front warp's read of
// slot s (with the doorbell); served from it if the check holds.  `gold` (lane 0): what this warp's
// bid for s returned (0: no bid).  Returns kRetry if the read did not hold and the doorbell has not
// shown s yet (`publish` == 0 or <= s): the caller waits for s again (and owns it).
__device__ uint32_t process_one(const GpuqKernelArgs& p, uint64_t s, uint32_t lane, uint64_t publish, uint4 mine,
                                bool cand, uint64_t gold) {
  const uint64_t shown = __shfl_sync(kFullMask, publish, 0);  // the doorbell's head, if this warp read it
  const bool won = gold <= s;  // lane 0's (a bid's latency hides under the check or the slot's read)
  if (cand) {
    const bool ok = read_holds(mine, s, lane);
    if (__shfl_sync(kFullMask, won ? 1u : 0u, 0) == 0u) return kGone;  // publishes nothing (serve_slot)
    if (ok) {
      serve_read(p, s, lane, mine, shown);
      return kServed;
    }
    if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&p.dev->spec_retries), 1ull);  // torn or stale
    if (shown <= s) return kRetry;  // the doorbell has not shown s: wait for it (or the slot) again
  }
  return serve_slot(p, s, lane, publish, won) ? kServed : kGone;
}

// A scout (the grid's last GpuqKernelArgs.scouts warps, one_read only; see bid()).  Scout j of K
// polls the slot of the message the front announced, not the doorbell, (j + 1) / (K + 1) of the
// front's period after the front's latest poll (GpuqDevState.poll_t, poll_per: its phase), while
// the front polls and that message is not taken.  It bids for a candidate at once (the bid's
// latency hides under the check) and serves the message if it wins: from its read if that holds,
// else as the message's front (below).  It leaves when the lease does (stop).  `processed`: this
// warp's count (warp_counters[warp]).
__device__ void scout_loop(const GpuqKernelArgs& p, uint32_t lane, uint32_t warp, uint32_t j, uint64_t& processed) {
  GpuqDevState* dev = p.dev;
  const uint32_t words = p.slot_bytes / 4u < 16u ? p.slot_bytes / 4u : 16u;
  uint32_t ns = 32u;
  for (;;) {
    uint32_t act = 0u;  // 0: look again, 1: poll slot s, 2: leave
    uint64_t s = 0;
#ifdef GPUQ_TRACE
    unsigned long long t_issue = 0;
    uint64_t g_issue = 0;
#endif
    if (lane == 0) {
      const uint64_t f = volatile_load(&dev->front);
      const uint64_t g = volatile_load(&dev->grab);
      const uint64_t t = volatile_load(&dev->poll_t);
      const uint64_t per = volatile_load(&dev->poll_per);
      if (load_acquire<kGpu>(&dev->stop) != GPUQ_RUN) {
        act = 2u;
      } else if (f > g && per != 0u && per < (1u << 20)) {  // announced, not taken; the front's period is known
        const uint64_t now = globaltimer_ns();
        if (now - t < 4u * per) {  // the front is polling (not asleep, not gone)
          // The next phase point of this scout at or after now, or one that passed less than
          // half a gap ago (its round trip may run a little longer than the front's period).
          const uint64_t gap = per / (p.scouts + 1u);
#ifdef GPUQ_SCOUT_PHASE16  // a diagnostic (probe_poll.py): the first scout's phase, in 16ths of the period
          uint64_t at = t + per * GPUQ_SCOUT_PHASE16 / 16u + gap * j;
#else
          uint64_t at = t + gap * (j + 1u);
#endif
          if (at + gap / 2u < now) at += ((now - at - gap / 2u) / per + 1u) * per;
          while (globaltimer_ns() < at) {
          }
          s = f - 1u;
          act = 1u;
          ns = 32u;
        }
      }
      if (act == 0u) backoff(ns, 256u);
    }
    act = __shfl_sync(kFullMask, act, 0);
    if (act == 2u) break;
    if (act == 0u) continue;
    s = __shfl_sync(kFullMask, s, 0);
    const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
#ifdef GPUQ_TRACE
    if (lane == 0) { t_issue = clock64(); g_issue = globaltimer_ns(); }
#endif
    if (lane == kHdrLane) {
      v = __ldcv(reinterpret_cast<const uint4*>(p.req_hdr + slot));
    } else if (lane >= kWordLane && lane - kWordLane < words) {
      v.x = __ldcv(reinterpret_cast<const uint32_t*>(p.req_data + static_cast<size_t>(slot) * p.slot_bytes) +
                   (lane - kWordLane));
    }
    uint4 hdr = shfl4(v, kHdrLane);
    if (!slot_candidate(p, hdr, s)) continue;
    uint64_t gold = 0;
    if (lane == 0) gold = bid(dev, s);
    bool holds = read_holds(v, s, lane);
    if (__shfl_sync(kFullMask, gold <= s ? 1u : 0u, 0) == 0u) continue;  // the front (or a scout) has s
#ifdef GPUQ_TRACE
    if (lane == 0) { gpuq_trace_g[0] = t_issue; GPUQ_TRACE_AT(1); gpuq_trace_g[6] = (1ull << 32) | j; gpuq_trace_g[7] = g_issue; }
#endif
    if (holds) {
      serve_read(p, s, lane, v, 0u);  // publishes s + 1 only: a scout never publishes the doorbell's head
    } else {
      // This scout owns s, and the read did not hold (torn or stale): the front has given s up
      // (wait_for: kLost), so the scout waits for s as its front, with the lease's duties (the
      // time check, the last read), until s is served or the lease ends first (NO_MSG: s is at or
      // above the lease's final head, so the next lease claims it again).
      if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&dev->spec_retries), 1ull);
      uint32_t r = kRetry;
      while (r == kRetry) {
        uint64_t publish = 0, none = 0;
        bool cand = false;
        uint4 mine = make_uint4(0u, 0u, 0u, 0u);
        const uint64_t w = wait_for(p, s, lane, true, publish, mine, cand, none);
        __syncwarp();  // orders lane 0's acquire before every lane's reads of the slot
        if (w == GPUQ_NO_MSG) break;
        r = process_one(p, s, lane, publish, mine, cand, 0u);
      }
      if (r != kServed) continue;
    }
    ++processed;
    if (lane == 0) *reinterpret_cast<volatile uint64_t*>(p.warp_counters + warp) = processed;
  }
}

// A range of m (2 .. 32) published messages s0 .. s0 + m - 1 claimed by this warp (a backlog):
// one PCIe round trip for all their headers and first 64 bytes (lane j reads message s0 + j's),
// the plugin on each in turn, then one system fence and every result's msg_id.
__device__ void process_range(const GpuqKernelArgs& p, uint64_t s0, uint32_t m, uint32_t lane) {
  const uint64_t s = s0 + lane;
  const uint32_t slot = static_cast<uint32_t>(s & (p.capacity - 1u));
  const uint8_t* src = p.req_data + static_cast<size_t>(slot) * p.slot_bytes;
  uint8_t* vslot = p.vram_slots + static_cast<size_t>(slot) * (16u + p.slot_bytes);
  // The first 64 bytes of each message come with the headers where slots are at most 512 bytes (a
  // message of <= 64 bytes is then staged from this read alone); in larger slots the payloads are
  // staged whole, from byte 0 (4 KB: 37.5 -> 40.5 GB/s each way, benchmarks/NOTES.md).
  const uint32_t chunks = p.slot_bytes > 512u ? 0u : p.slot_bytes / 16u < 4u ? p.slot_bytes / 16u : 4u;
  uint4 hdr = make_uint4(0u, 0u, 0u, 0u), d[4];
  if (lane < m) {
    hdr = __ldcv(reinterpret_cast<const uint4*>(p.req_hdr + slot));
#pragma unroll
    for (uint32_t k = 0; k < 4u; ++k) {
      if (k < chunks) d[k] = __ldcv(reinterpret_cast<const uint4*>(src) + k);
    }
  }
  uint32_t len = 0, code = GPUQ_ERR_NONE;
  const bool in_vram = (hdr.y & GPUQ_REQ_IN_VRAM) != 0u;  // enqueue_device: already in the VRAM slot
  if (lane == m - 1u && p.one_read != 0u)  // the polls' hint: whether the last of the range was checked
    *reinterpret_cast<volatile uint32_t*>(&p.dev->unchecked) = (hdr.y & GPUQ_REQ_CHECKED) != 0u ? 0u : 1u;
  if (lane < m) {
    code = check_request(p, hdr, s, len);
#pragma unroll
    for (uint32_t k = 0; k < 4u; ++k) {
      if (!in_vram && k < chunks && k * 16u < len) *reinterpret_cast<uint4*>(vslot + 16 + k * 16u) = d[k];
    }
  }
  __syncwarp();
  for (uint32_t j = 0; j < m; ++j) {
    const uint64_t sj = s0 + j;
    const uint32_t slot_j = static_cast<uint32_t>(sj & (p.capacity - 1u));
    const uint32_t len_j = __shfl_sync(kFullMask, len, j);
    const uint32_t code_j = __shfl_sync(kFullMask, code, j);
    const bool in_vram_j = __shfl_sync(kFullMask, in_vram ? 1u : 0u, j) != 0u;
    uint8_t* vslot_j = p.vram_slots + static_cast<size_t>(slot_j) * (16u + p.slot_bytes);
    // The rest from byte 0 again, not 64: whole 512-byte runs, aligned as the slot is (the first 64
    // bytes are read twice; runs from byte 64 split their first and last lines: 4 KB 36.3 -> 38.4
    // GB/s each way, benchmarks/NOTES.md).
    if (!in_vram_j && len_j > 16u * chunks)
      stage_rest(p.req_data + static_cast<size_t>(slot_j) * p.slot_bytes, vslot_j + 16, 0u, len_j, lane);
    run_plugin(p, sj, slot_j, vslot_j, len_j, code_j, lane);
  }
  // INFLIGHT -> DONE for all m: every lane's fence after the warp barrier orders the whole
  // warp's result writes (cumulativity) before the msg_id stores.
  __syncwarp();
  __threadfence_system();
  if (lane < m) {
    *reinterpret_cast<volatile uint64_t*>(&p.res_hdr[slot].msg_id) = s;
    reinterpret_cast<GpuqSlotHeader*>(vslot)->flags = GPUQ_DONE;
  }
}

// The last warp out of a lease: every other warp has left, so it alone resets the device state for
// the next lease (claims abandoned at or above the head are handed out again), then reports the
// end: state PARKED (on time) or EXITED (the host asked to stop), and, last, leases_ended, so that
// a host that reads leases_ended before state never sees every lease ended beside RUNNING
// (GpuQueue.stats).
__device__ void end_lease(const GpuqKernelArgs& p) {
  GpuqDevState* dev = p.dev;
  const uint32_t stop = dev->stop;
  const uint64_t ended = dev->leases + 1u;
  dev->claim = dev->head;
  dev->grab = dev->head;  // scouts: nothing at or above the head is taken (bid())
  dev->front = 0u;
  dev->poll_per = 0u;
  dev->stop = GPUQ_RUN;
  dev->leaving = 0u;
  dev->exited = 0u;
  dev->begun = 0u;
  dev->leases = ended;
  __threadfence();
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->spec_reads) = dev->spec_reads;
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->spec_retries) = dev->spec_retries;
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_leaving) = ended;  // also after DRAIN/ABORT
  const bool host_stop = stop == GPUQ_STOP_DRAIN || stop == GPUQ_STOP_ABORT;
  store_release<kSys>(&p.ctrl_dev->state, host_stop ? GPUQ_KERNEL_EXITED : GPUQ_KERNEL_PARKED);
  __threadfence_system();
  *reinterpret_cast<volatile uint64_t*>(&p.ctrl_dev->leases_ended) = ended;
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
  // The CRC table of the one read's check (gpuq_crc.cuh, 8 KB), in shared memory.
  if (p.one_read != 0u) {
    const uint4* src = reinterpret_cast<const uint4*>(kCrcNibbles);
    uint4* dst = reinterpret_cast<uint4*>(crc_smem);
    for (uint32_t i = threadIdx.x; i < 2048u / 4u; i += blockDim.x) dst[i] = src[i];
    __syncthreads();
  }
  uint64_t processed = p.warp_totals[warp];  // carried over from the previous lease
  if (p.scouts != 0u && warp >= warps - p.scouts) {
    scout_loop(p, lane, warp, warp - (warps - p.scouts), processed);
  } else {
    uint64_t next = 0, end = 0;  // lane 0: this warp's claimed msg_ids [next, end), served in order
    bool owned = false;          // lane 0: this warp won its bid for `next` (its read of it was torn)
    for (;;) {
      uint64_t s = 0, publish = 0, gold = 0;
      uint32_t range = 0;
      bool cand = false;
      uint4 mine = make_uint4(0u, 0u, 0u, 0u);
      if (lane == 0) {
        GpuqDevState* dev = p.dev;
        const uint64_t h = load_acquire<kGpu>(&dev->head);
        if (next == end) {
          // Claim one msg_id, or a range when a backlog waits: about the backlog's share per warp
          // (at most 32), so that an idle queue's messages go one per warp as before.
          const uint64_t c = volatile_load(&dev->claim);
          const uint64_t share = h > c ? (h - c) / warps : 0u;
          const uint64_t want = share < 1u ? 1u : share > 32u ? 32u : share;
          next = atomicAdd(reinterpret_cast<unsigned long long*>(&dev->claim), static_cast<unsigned long long>(want));
          end = next + want;
        }
        const uint64_t ready = (h < end ? h : end);
        if (ready >= next + 2u && load_acquire<kGpu>(&dev->stop) != GPUQ_STOP_ABORT) {
          s = next;
          range = static_cast<uint32_t>(ready - next);
        }
      }
      range = __shfl_sync(kFullMask, range, 0);
      if (range != 0u) {
        s = __shfl_sync(kFullMask, s, 0);
      } else {
        s = wait_for(p, __shfl_sync(kFullMask, next, 0), lane, owned, publish, mine, cand, gold);
      }
      __syncwarp();  // orders lane 0's acquire before every lane's reads of the slots
      if (s == GPUQ_NO_MSG) break;
      uint32_t done = 1u, served = 0u;
      if (range != 0u) {
        process_range(p, s, range, lane);
        done = served = range;
      } else if (s != kLost) {
        const uint32_t r = process_one(p, s, lane, publish, mine, cand, gold);
        if (r == kRetry) {  // a torn or stale slot read: wait for s again (won, if there was a bid)
          owned = true;
          continue;
        }
        served = r == kServed ? 1u : 0u;
      }
      processed += served;  // kLost, kGone: a scout served `next`; the claim is spent
      if (lane == 0) {
        next += done;
        owned = false;
        *reinterpret_cast<volatile uint64_t*>(p.warp_counters + warp) = processed;
      }
    }
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
      GPUQ_OFFSETOF(GpuqCtrlDev, leases_leaving), GPUQ_OFFSETOF(GpuqCtrlDev, spec_reads),
      GPUQ_OFFSETOF(GpuqCtrlDev, spec_retries), GPUQ_OFFSETOF(GpuqCtrlDev, front),
      sizeof(GpuqDevState), sizeof(GpuqKernelArgs), GPUQ_OFFSETOF(GpuqKernelArgs, warp_totals),
      GPUQ_OFFSETOF(GpuqKernelArgs, lease_ns), GPUQ_OFFSETOF(GpuqKernelArgs, capacity), GPUQ_OFFSETOF(GpuqKernelArgs, slot_bytes),
      GPUQ_OFFSETOF(GpuqKernelArgs, front_backoff_ns), GPUQ_OFFSETOF(GpuqKernelArgs, idle_backoff_ns),
      GPUQ_OFFSETOF(GpuqKernelArgs, one_read), GPUQ_OFFSETOF(GpuqKernelArgs, scouts),
  };
  for (unsigned i = 0; i < sizeof(v) / sizeof(v[0]); ++i) out[i] = v[i];
}
