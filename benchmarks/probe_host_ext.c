/* probe_host_ext.c -- a CPython extension module with GpuQueue.enqueue's and try_dequeue_result's
   hot paths in C (benchmarks/probe_host.py's "ext" host): what a compiled extension for those two
   calls would give a Python caller.  A measurement, not part of the library: one queue at a time
   (bind), messages of at most 64 bytes checked as GpuQueue.enqueue checks them, results taken in
   msg_id order only, no ring-full wait, no lease handling (the queue must never leave).

   Store order as probe_host.c: x86-64 TSO plus compiler barriers; an atomic flag stands for the
   producer lock (uncontended: one test-and-set and one clear). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BARRIER() __asm__ __volatile__("" ::: "memory")

static struct {
  uint8_t* req_data;
  uint64_t* req_hdr;
  volatile uint64_t* res_hdr;
  const uint8_t* res_data;
  volatile uint64_t* doorbell;
  volatile uint64_t* front;
  uint64_t head, tail, mask, slot_bytes;
  int one_read;
  uint32_t check_low;
  char lock;
} q;

static uint32_t crc_table[256];

static uint32_t crc32z(uint32_t seed, const uint8_t* p, Py_ssize_t n) {
  uint32_t c = ~seed;
  while (n--) c = crc_table[(c ^ *p++) & 0xFFu] ^ (c >> 8);
  return ~c;
}

static PyObject* bind(PyObject* self, PyObject* args) {
  unsigned long long a[6], head, mask, sb;
  int one_read;
  unsigned int check_low;
  if (!PyArg_ParseTuple(args, "KKKKKKKKKpI", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &head, &mask, &sb, &one_read,
                        &check_low))
    return NULL;
  q.req_data = (uint8_t*)(uintptr_t)a[0];
  q.req_hdr = (uint64_t*)(uintptr_t)a[1];
  q.res_hdr = (volatile uint64_t*)(uintptr_t)a[2];
  q.res_data = (const uint8_t*)(uintptr_t)a[3];
  q.doorbell = (volatile uint64_t*)(uintptr_t)a[4];
  q.front = (volatile uint64_t*)(uintptr_t)a[5];
  q.head = q.tail = head;
  q.mask = mask;
  q.slot_bytes = sb;
  q.one_read = one_read;
  q.check_low = check_low;
  Py_RETURN_NONE;
}

static PyObject* head(PyObject* self, PyObject* unused) { return PyLong_FromUnsignedLongLong(q.head); }

/* enqueue(payload: bytes) -> msg_id */
static PyObject* enqueue(PyObject* self, PyObject* payload) {
  if (!PyBytes_Check(payload)) {
    PyErr_SetString(PyExc_TypeError, "payload must be bytes");
    return NULL;
  }
  const Py_ssize_t n = PyBytes_GET_SIZE(payload);
  if ((uint64_t)n > q.slot_bytes) {
    PyErr_SetString(PyExc_ValueError, "payload larger than slot_bytes");
    return NULL;
  }
  const uint8_t* p = (const uint8_t*)PyBytes_AS_STRING(payload);
  while (__atomic_test_and_set(&q.lock, __ATOMIC_ACQUIRE)) {
  }
  const uint64_t seq = q.head;
  const uint64_t slot = seq & q.mask;
  memcpy(q.req_data + slot * q.slot_bytes, p, (size_t)n);
  BARRIER();
  uint32_t* h32 = (uint32_t*)q.req_hdr;
  if (q.one_read && n <= 64 && seq - *q.front < 2) {
    h32[slot * 4] = (uint32_t)n;
    h32[slot * 4 + 1] = (crc32z((uint32_t)(seq ^ ((uint64_t)n << 24)), p, n) | 0xFFu) ^ q.check_low;
  } else {
    q.req_hdr[slot * 2] = (uint64_t)n | (1ull << 32);
  }
  BARRIER();
  ((volatile uint64_t*)q.req_hdr)[slot * 2 + 1] = seq;
  BARRIER();
  q.head = seq + 1;
  *q.doorbell = seq + 1;
  __atomic_clear(&q.lock, __ATOMIC_RELEASE);
  return PyLong_FromUnsignedLongLong(seq);
}

/* take(msg_id) -> bytes, or None while it is not done (in msg_id order only) */
static PyObject* take(PyObject* self, PyObject* arg) {
  const unsigned long long mid = PyLong_AsUnsignedLongLong(arg);
  if (mid == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
  const uint64_t slot = mid & q.mask;
  if (mid != q.tail || q.res_hdr[slot * 2 + 1] != mid) Py_RETURN_NONE;
  BARRIER();
  const uint64_t len_flags = q.res_hdr[slot * 2];
  PyObject* out = PyBytes_FromStringAndSize((const char*)q.res_data + slot * q.slot_bytes, (Py_ssize_t)(uint32_t)len_flags);
  q.tail = mid + 1;
  return out;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(6 addresses, head, mask, slot_bytes, one_read, check_low)"},
    {"head", head, METH_NOARGS, "the next msg_id"},
    {"enqueue", enqueue, METH_O, "enqueue(payload) -> msg_id"},
    {"take", take, METH_O, "take(msg_id) -> bytes or None"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "probe_host_ext", NULL, -1, methods};

PyMODINIT_FUNC PyInit_probe_host_ext(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
  return PyModule_Create(&module);
}
