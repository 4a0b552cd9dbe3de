"""Each built-in plugin on 100,000 random messages on the GPU, through GpuQueue and through the
batch path (BatchProcessor, cuda backend), every result checked against an independent reference:
``echo`` against the payload, ``crc32c`` against the ``crc32c`` package (a well-kept C
implementation; the Python twin where it is not installed).  Skipped with the reason without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuq_driver import BatchProcessor, GpuQueue, QueueConfig
from gpuq_driver.plugins import crc32c_twin

MESSAGES, SLOT = 100_000, 256


def reference(name: str):
    if name == "echo":
        return bytes
    try:
        import crc32c
    except ImportError:
        return lambda p: crc32c_twin(memoryview(p), 0)
    return lambda p: crc32c.crc32c(p).to_bytes(4, "little")


def random_messages(seed: int) -> tuple[np.ndarray, bytes]:
    """MESSAGES random sizes 0 .. SLOT (the edges included) and their random bytes back to back."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, SLOT + 1, MESSAGES, dtype=np.uint32)
    lens[:4] = (0, 1, SLOT - 1, SLOT)
    return lens, rng.integers(0, 256, int(lens.sum()), dtype=np.uint8).tobytes()


def split(lens: np.ndarray, data) -> list[bytes]:
    ends = np.cumsum(lens, dtype=np.int64).tolist()
    return [bytes(data[e - m : e]) for m, e in zip(lens.tolist(), ends)]


@pytest.mark.parametrize("name", ["echo", "crc32c"])
def test_builtin_through_gpuqueue(gpu, name):
    lens, data = random_messages(seed=11)
    payloads, ref = split(lens, data), reference(name)
    window = 1024
    with GpuQueue(QueueConfig(plugin=name, capacity=4096, slot_bytes=SLOT)) as q:
        first = q.enqueue(payloads[0])
        wrong = []
        for i in range(1, MESSAGES + window):
            if i < MESSAGES:
                q.enqueue(payloads[i])
            if i >= window:
                j = i - window
                if q.wait_result(first + j, timeout=10) != ref(payloads[j]):
                    wrong.append(j)
        s = q.stats()
    assert wrong == [], f"{len(wrong)} wrong results, first msg_ids {wrong[:5]}"
    assert (s.enqueued, s.processed, s.taken) == (MESSAGES, MESSAGES, MESSAGES)


@pytest.mark.parametrize("name", ["echo", "crc32c"])
def test_builtin_through_batch_processor(gpu, name):
    lens, data = random_messages(seed=12)
    payloads, ref = split(lens, data), reference(name)
    batch = 4096
    bp = BatchProcessor(slot_bytes=SLOT, max_batch=batch, plugin=name, backend="cuda")
    try:
        results = []
        for s in range(0, MESSAGES, batch):
            out_lens, out = bp.process_packed(lens[s : s + batch], b"".join(payloads[s : s + batch]))
            results += split(out_lens, out)
    finally:
        bp.close()
    wrong = [i for i, (r, p) in enumerate(zip(results, payloads)) if r != ref(p)]
    assert len(results) == MESSAGES
    assert wrong == [], f"{len(wrong)} wrong results, first indices {wrong[:5]}"
