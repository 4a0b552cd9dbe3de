/* A compiled host for the queue's round trip (diagnostic, issue 11): the same stores as
   GpuQueue.enqueue (payload, header with the one read's check where the front waits, msg_id,
   doorbell), a spin on the result's msg_id, then the copy out, in C.  x86 TSO: plain stores in
   program order; compiler barriers keep them so. */
#include <stdint.h>
#include <string.h>
#include <time.h>

static uint32_t table[256];
static void init_table(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
}
static uint32_t crc32z(uint32_t crc, const uint8_t* p, uint32_t n) {
  crc = ~crc;
  while (n--) crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return ~crc;
}
uint32_t crc_py(uint32_t seed, const uint8_t* p, uint32_t n) { if (!table[1]) init_table(); return crc32z(seed, p, n); }

static inline int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
#define BARRIER() __asm__ __volatile__("" ::: "memory")

/* Returns wrong results; out: iters x 2 (readable, taken) ns. */
int64_t run(uint8_t* req_data, uint64_t* req_hdr, volatile uint64_t* res_hdr, const uint8_t* res_data,
            volatile uint64_t* doorbell, volatile uint64_t* front, uint64_t head, uint64_t mask, uint64_t sb,
            const uint8_t* payloads, uint32_t n, int iters, int one_read, uint32_t check_low, int64_t* out) {
  if (!table[1]) init_table();
  uint8_t buf[4096];
  int64_t bad = 0;
  uint32_t* h32 = (uint32_t*)req_hdr;
  for (int i = 0; i < iters; i++) {
    const uint8_t* p = payloads + (size_t)(i & 15) * n;
    int64_t t0 = now_ns();
    uint64_t seq = head++;
    uint64_t slot = seq & mask;
    memcpy(req_data + slot * sb, p, n);
    BARRIER();
    if (one_read && n <= 64 && seq - *front < 2) {
      h32[slot * 4] = n;
      h32[slot * 4 + 1] = (crc32z((uint32_t)(seq ^ ((uint64_t)n << 24)), p, n) | 0xFFu) ^ check_low;
    } else {
      req_hdr[slot * 2] = (uint64_t)n | (1ull << 32);
    }
    BARRIER();
    ((volatile uint64_t*)req_hdr)[slot * 2 + 1] = seq;
    BARRIER();
    *doorbell = seq + 1;
    while (res_hdr[slot * 2 + 1] != seq) {
    }
    BARRIER();
    int64_t t1 = now_ns();
    uint32_t len = (uint32_t)res_hdr[slot * 2];
    memcpy(buf, res_data + slot * sb, len);
    int64_t t2 = now_ns();
    bad += len != n || memcmp(buf, p, n) != 0;
    out[2 * i] = t1 - t0;
    out[2 * i + 1] = t2 - t0;
  }
  return bad;
}
