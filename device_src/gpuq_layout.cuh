// gpuq_layout.cuh -- the one definition of the queue's shared memory layout.
//
// Mirrored on the host by gpuq_driver/layout.py (ctypes); the layout probe kernel in
// gpuq_queue.cu reports sizeof/offsetof of every struct here and the host refuses to start
// if one differs.  Change both files together.
//
// Where each region lives and who writes it (exactly one writer per field on each side of PCIe):
//
//   region            memory                      writer            reader
//   ---------------   -------------------------   ---------------   -----------------------
//   GpuqCtrlHost      mapped pinned (host RAM)    host              device (front warp)
//   GpuqCtrlDev       mapped pinned               device            host
//                     (RUNNING, leases_begun: the first front warp of a lease; leases_leaving:
//                     the front warp whose lease is up; PARKED/EXITED, leases_ended: the last
//                     warp out; error: the first to fail)
//   req_hdr[cap]      mapped pinned               host              device (owning warp)
//   req_data[cap]     mapped pinned               host              device (owning warp)
//   res_hdr[cap]      mapped pinned               device            host
//   res_data[cap]     mapped pinned, or VRAM      device            host (a VRAM ring: read by
//                     (result_memory="device")                        DtoH copies, or lent as device arrays)
//   warp_counters[W]  mapped pinned               device (warp w)   host
//   vram_slots[cap]   VRAM                        device (host:     device (plugin input)
//                                                 enqueue_device's
//                                                 D2D copies)
//   GpuqDevState      VRAM                        device            device
//   warp_totals[W]    VRAM                        device (warp w)   device (warp w, next lease)
//
// Slot life (one ring of `capacity` slots, a power of two; message msg_id lives in slot
// msg_id & (capacity - 1)):
//
//   EMPTY    -> READY     host writes req_data, then req_hdr {len, flags, msg_id}, then
//                         GpuqCtrlHost.doorbell = msg_id + 1, in that order (x86 TSO); flags =
//                         READY, plus the slot check where the host made one ("One read", below)
//   READY    -> INFLIGHT  a warp that claimed msg_id (atomicAdd on GpuqDevState.claim; a range of
//                         up to 32 at once when many wait) sees head > msg_id, or (the front warp)
//                         a slot whose check holds, and copies the payload into its VRAM slot
//                         (unless the request flags have GPUQ_REQ_IN_VRAM: the host copied it there
//                         device to device, and waited for that copy, before writing the header;
//                         enqueue_device)
//   INFLIGHT -> DONE      the plugin writes res_data; __threadfence_system(); then res_hdr
//                         {len, flags} and, last, res_hdr.msg_id = msg_id (release, system scope);
//                         flags = DONE | protocol error << GPUQ_ERR_SHIFT | plugin status (below)
//   DONE     -> EMPTY     the host copies the result out; the slot may then take msg_id + capacity
//
// The host never writes a slot whose previous result it has not taken, so the device never sees
// a slot reused under it.
//
// Leases (docs/design.md, "Sharing the GPU").  One launch serves the queue for at most
// GpuqKernelArgs.lease_ns, then leaves at a message boundary so that other CUDA work in the process
// (context synchronisation, cuMemFree, module loads, large GEMMs) gets through; the host launches
// the next lease on the same stream.  A lease ends when the front warp (the one whose claim equals
// the head) finds its time up before reading the doorbell: it stores leases_leaving, fences, reads
// the doorbell one last time and publishes that head with GpuqDevState.stop = LEAVE, so exactly
// the msg_ids below it are processed in this lease and later ones wait in their READY slots for
// the next.  The last warp out resets claim = head, so msg_ids stay consecutive across leases.
//
// Who relaunches (the host; no lease is lost, none is needed while the queue is idle).  Two
// handshakes of the same shape (store -> full fence -> load on both sides, so one side sees the
// other's store):
//   device, first front warp of lease n:  leases_begun = n; fence.sc.sys; then reads the doorbell
//   device, front warp of lease n leaving: leases_leaving = n; fence.sc.sys; one last doorbell read
//   host, after publishing a message:     (lock release = full fence) then, under the launch lock,
//                                         if leases_begun == launches and leases_leaving ==
//                                         launches, launch lease launches + 1 on the queue's stream
// A lease not yet begun, or begun and not yet leaving, when the host looks will read the doorbell
// after the host's store; otherwise the host launches one that will.  So every message is read by
// some lease.  (Besides, so that one lease always waits queued behind the running one: while
// messages flow a producer launches lease n + 1 once lease n - 1 is leaving and lease n has not
// begun, the hand-over its message waits for anyway, or else once lease n has begun; while the
// queue lingers the host's lease keeper does; lease.py.)
//
// One read (docs/design.md, "One read per message").  The front warp (the one waiting for the
// message at the head) reads, in one PCIe round trip, the doorbell and slot head's header and
// first 64 payload bytes.  Nothing orders those reads with respect to one another, nor makes one
// read a snapshot, so the slot's bytes may be torn (part new, part the previous message's) or
// stale.  The host therefore puts a check in the header's flags: READY | GPUQ_REQ_CHECKED |
// check << 8, with check = the top 24 bits of zlib.crc32(payload[0 : min(len, 64)], (msg_id ^
// len << 24) mod 2^32).  The warp serves the message from that read only if the header's msg_id is
// its own and the check holds over what it read (msg_id and len bind the header, the CRC the bytes);
// only messages of at most 64 bytes are served this way (the rest of a longer one would need a
// system-scope acquire fence after the check, which costs more than the round trip it saves).
// Anything else, torn, stale, longer or unchecked, is read again
// (GpuqDevState.spec_retries) or waits for the doorbell, which stays the source of truth for the
// head, stop requests and the lease handshakes.  The host checks a message only where the front
// warp may be waiting for it (GpuqCtrlDev.front, which the front warp stores as it begins to poll
// for a message, is that message's msg_id; GpuQueue.enqueue), and the front warp reads the
// slot in its polls only while the last message served was checked (GpuqDevState.unchecked), so
// that a stream of unchecked messages (a backlog, or longer ones) is polled by the doorbell alone,
// as without the one read.  Both are hints: they change which reads are made, never what is
// served.
//
// Scouts (GpuqKernelArgs.scouts; docs/design.md, "Scouts").  With the one read, the grid's last
// `scouts` warps poll the slot the front announced (GpuqDevState.front) between the front's polls
// (its phase: poll_t, poll_per); the front and the scouts bid for that message (atomicMax on
// GpuqDevState.grab) and only the first bid serves it (gpuq_queue.cu, bid()).
#pragma once

#ifdef __CUDACC_RTC__
#include <cuda/std/cstdint>
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::uint8_t;
#else
#include <cstdint>
#endif

#define GPUQ_LAYOUT_VERSION 7u  // 7: GpuqCtrlDev.front, GpuqDevState.unchecked; 6: scouts (GpuqDevState.front .. poll_per, GpuqKernelArgs.scouts)

// Slot states (GpuqSlotHeader.flags, low byte).
#define GPUQ_EMPTY 0u
#define GPUQ_READY 1u
#define GPUQ_INFLIGHT 2u
#define GPUQ_DONE 3u
// A request's flags (req_hdr): bits 0..3 the state (READY); bit 4 GPUQ_REQ_IN_VRAM, the payload is
// already in the message's VRAM slot (enqueue_device); bit 5 GPUQ_REQ_CHECKED, bits 8..31 hold the
// slot check ("One read" above).
#define GPUQ_REQ_IN_VRAM 0x10u
#define GPUQ_REQ_CHECKED 0x20u
#define GPUQ_CHECK_SHIFT 8
#define GPUQ_CHECK_MASK 0xFFFFFFu
#define GPUQ_CHECK_BYTES 64u

// Stop requests, carried in the doorbell's top byte (GpuqCtrlHost.doorbell >> 56).
#define GPUQ_RUN 0u
#define GPUQ_STOP_DRAIN 1u  // finish every published message, then exit
#define GPUQ_STOP_ABORT 2u  // exit once each warp is idle; messages not yet handed out stay unprocessed
#define GPUQ_STOP_LEAVE 3u  // device only (GpuqDevState.stop): the lease is over, the head is final
#define GPUQ_DOORBELL_STOP_SHIFT 56
#define GPUQ_DOORBELL_HEAD_MASK ((1ull << GPUQ_DOORBELL_STOP_SHIFT) - 1ull)

// GpuqCtrlDev.state values.
#define GPUQ_KERNEL_NOT_STARTED 0u
#define GPUQ_KERNEL_RUNNING 1u
#define GPUQ_KERNEL_EXITED 2u  // stopped for good: a lease saw the host's DRAIN or ABORT
#define GPUQ_KERNEL_PARKED 3u  // a lease ended on time; the host launches the next on demand

// GpuqCtrlDev.error values (first protocol error the device saw; 0 = none).
#define GPUQ_ERR_NONE 0u
#define GPUQ_ERR_BAD_MSG_ID 1u  // req_hdr.msg_id differs from the claimed msg_id
#define GPUQ_ERR_BAD_LEN 2u     // req_hdr.len > slot_bytes
#define GPUQ_ERR_BAD_RESULT 3u  // plugin returned a length > slot_bytes (and < GPUQ_FAIL_BIT)

// GpuqSlotHeader.flags of a result (res_hdr), one 32-bit word:
//   bits  0..7   the state, GPUQ_DONE
//   bits  8..14  a protocol error of this message (GPUQ_ERR_*; 0 = none), result empty
//   bit  15      GPUQ_RESULT_FAILED: the plugin failed the message (it returned GPUQ_FAIL(code),
//                gpuq_plugin_api.cuh); result empty; not a protocol error (GpuqCtrlDev.error untouched)
//   bits 16..31  that failure's code, 0..65535 (0 unless GPUQ_RESULT_FAILED)
// A plain success is flags == GPUQ_DONE.
#define GPUQ_ERR_SHIFT 8
#define GPUQ_ERR_MASK 0x7Fu
#define GPUQ_RESULT_FAILED 0x8000u
#define GPUQ_FAIL_CODE_SHIFT 16

#define GPUQ_NO_MSG 0xFFFFFFFFFFFFFFFFull  // msg_id of a slot never written

// 16 B, 16-byte aligned: the header of every slot, in every ring.
struct __align__(16) GpuqSlotHeader {
  uint32_t len;     // payload bytes, 0..slot_bytes
  uint32_t flags;   // GPUQ_* state (a result's: see GPUQ_RESULT_FAILED above)
  uint64_t msg_id;  // written last; GPUQ_NO_MSG until first use
};

// Host-written control line (128 B, its own cache line pair).  One 64-bit word, so the front
// warp learns the head and a stop request from one acquire load (one PCIe round trip):
//   doorbell = head | (stop << GPUQ_DOORBELL_STOP_SHIFT)
// head = number of messages published (the next msg_id); stop = GPUQ_RUN / _STOP_DRAIN / _ABORT.
struct __align__(128) GpuqCtrlHost {
  uint64_t doorbell;
  uint64_t pad[15];
};

// Device-written control line (128 B): state RUNNING and leases_begun by the first front warp
// of each lease, leases_leaving by its front warp when its time is up, PARKED/EXITED and, last,
// leases_ended (and leases_leaving again) by its last warp to leave; error fields by the
// first warp to see a broken slot (VRAM CAS first).
struct __align__(128) GpuqCtrlDev {
  uint32_t state;       // GPUQ_KERNEL_*
  uint32_t error;       // GPUQ_ERR_*
  uint64_t error_msg_id;
  uint32_t layout_version;
  uint32_t warps;       // worker warps in the grid
  uint64_t leases_begun;  // leases that have read the doorbell (1, 2, ...)
  uint64_t leases_ended;  // leases whose last warp has left
  uint64_t leases_leaving;  // leases whose time is up (set before their last doorbell read)
  uint64_t spec_reads;      // messages served from the front warp's one read (copied at each lease end)
  uint64_t spec_retries;    // such reads that failed the check (torn or stale) and were read again
  uint64_t front;           // one_read: the msg_id the front warp polls for (the host checks a message
                            // only where it may be waiting for it; GpuQueue.enqueue); a hint
  uint64_t pad[7];
};

// Device-only scalars in VRAM; zeroed by the host before the first lease, carried from lease to
// lease by the device (the last warp out resets them for the next).
struct __align__(128) GpuqDevState {
  uint64_t claim;   // next msg_id a warp may claim (atomicAdd)
  uint64_t pad0[15];
  uint64_t head;    // last head the front warp saw (fetch_max, release)
  uint32_t stop;    // last stop request the front warp saw, or GPUQ_STOP_LEAVE
  uint32_t exited;  // warps that have left the loop in this lease
  uint32_t error;   // first GPUQ_ERR_* (atomicCAS), mirrored to GpuqCtrlDev.error
  uint32_t begun;   // 1 once this lease's first front warp has announced it
  uint64_t lease_start;  // %globaltimer (ns) when this lease was announced
  uint64_t leases;       // leases ended so far
  uint32_t leaving;      // 1 once a front warp has begun this lease's last doorbell read
  uint32_t unchecked;    // 1 if the last message served had no slot check: the front warp's polls
                         // then read the doorbell alone ("One read"; carried from lease to lease)
  uint64_t spec_reads;   // GpuqCtrlDev.spec_reads, counted here (atomicAdd)
  uint64_t spec_retries;
  // Scouts ("One read": warps that poll the head slot beside the front warp, staggered in time).
  uint64_t front;     // msg_id + 1 of the message the front warp polls for (0: none this lease)
  uint64_t grab;      // 1 + the last such message taken (atomicMax), by its front or a scout
  uint64_t poll_t;    // %globaltimer (ns) at the front's latest poll
  uint64_t poll_per;  // ns between the front's last two polls
  uint64_t pad1[4];
};

// The persistent kernel's single argument (passed by value).
struct GpuqKernelArgs {
  GpuqCtrlHost* ctrl_host;
  GpuqCtrlDev* ctrl_dev;
  GpuqSlotHeader* req_hdr;
  uint8_t* req_data;
  GpuqSlotHeader* res_hdr;
  uint8_t* res_data;
  uint64_t* warp_counters;  // processed messages per warp (host-visible)
  uint8_t* vram_slots;      // capacity * (16 + slot_bytes) bytes
  GpuqDevState* dev;
  uint64_t* warp_totals;    // VRAM copy of warp_counters, carried from lease to lease
  uint64_t lease_ns;        // a lease leaves after this long (~0ull: never)
  uint32_t capacity;        // power of two
  uint32_t slot_bytes;      // multiple of 16
  uint32_t front_backoff_ns;
  uint32_t idle_backoff_ns;
  uint32_t one_read;        // 1: the front warp's polls read the slot too ("One read"); 0: the doorbell alone
  uint32_t scouts;          // with one_read: the grid's last `scouts` warps are scouts (0: none)
};

static_assert(sizeof(GpuqSlotHeader) == 16, "GpuqSlotHeader must be 16 bytes");
static_assert(sizeof(GpuqCtrlHost) == 128, "GpuqCtrlHost must be 128 bytes");
static_assert(sizeof(GpuqCtrlDev) == 128, "GpuqCtrlDev must be 128 bytes");
static_assert(sizeof(GpuqDevState) == 256, "GpuqDevState must be 256 bytes");
static_assert(sizeof(GpuqKernelArgs) == 112, "GpuqKernelArgs must be 112 bytes");
