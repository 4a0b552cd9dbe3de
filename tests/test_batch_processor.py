"""BatchProcessor (gpuq_driver.batch): one kernel launch per batch, no Redis.

GPU variants take the ``gpu`` fixture and skip without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuq_driver import BatchProcessor, ConfigError, GpuqError, PayloadError, PayloadTypeError
from gpuq_driver.batch import FAILED


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"slot_bytes": 17}, "slot_bytes"),
        ({"slot_bytes": 0}, "slot_bytes"),
        ({"slot_bytes": 2 << 20}, "slot_bytes"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"threads_per_block": 48}, "threads_per_block"),
        ({"backend": "opencl"}, "backend"),
        ({"plugin": "no-such-plugin", "backend": "numpy"}, "plugin"),
    ],
)
def test_batch_processor_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        BatchProcessor(**kwargs)


@pytest.mark.parametrize("proc_backend", ["numpy", "cuda"])
def test_batch_processor_direct(request, proc_backend):
    if proc_backend == "cuda":
        request.getfixturevalue("gpu")
    with BatchProcessor(slot_bytes=64, max_batch=8, backend=proc_backend) as proc:
        mixed = [b"", b"a", b"x" * 64, memoryview(b"mv-payload"), bytearray(b"ba")]
        assert proc.process(mixed) == [bytes(p) for p in mixed]
        equal = [bytes([i]) * 16 for i in range(8)]  # equal sizes: the strided path
        assert proc.process(equal) == equal
        assert proc.process([]) == []
        with pytest.raises(PayloadError, match=r"payload 1 is 65 bytes; slot_bytes is 64"):
            proc.process([b"ok", b"x" * 65, b"ok"])
        with pytest.raises(ValueError, match="max_batch is 8"):
            proc.process([b"x"] * 9)
        lens, out = proc.process_packed(np.array([2, 70, 3], np.uint32), b"ab" + b"y" * 70 + b"cde")
        assert lens.tolist() == [2, FAILED, 3] and bytes(out) == b"abcde"  # oversized: failed, not run
        with pytest.raises(ValueError, match="add up to"):
            proc.process_packed([2, 2], b"abc")
        assert proc.process([b"after"]) == [b"after"]  # errors left it usable
    assert proc.closed
    with pytest.raises(GpuqError, match="closed"):
        proc.process([b"x"])


@pytest.mark.parametrize(
    "lens, data, error, match",
    [
        ([1.5, 0.5], b"ab", PayloadTypeError, "lens must be a 1-D array of integers"),  # not truncated to [1, 0]
        ([True, True], b"ab", PayloadTypeError, "lens must be a 1-D array of integers"),
        ([[1, 1]], b"ab", PayloadTypeError, "lens must be a 1-D array of integers .* 2-D"),
        (None, b"", PayloadTypeError, "lens must be"),
        (5, b"xxxxx", PayloadTypeError, "lens must be"),
        ([-1], b"", PayloadError, r"lens\[0\]=-1 is negative"),
        ([1, 1 << 33], b"x", PayloadError, "message 1 is 8589934592 bytes; the uint32 limit is 4294967295"),
        ([1], "a", PayloadTypeError, "data must be a bytes-like object"),
        ([1], None, PayloadTypeError, "data must be a bytes-like object"),
        ([1, 1], np.arange(2, dtype=np.uint8)[::-1], PayloadTypeError, "data must be C-contiguous"),
        ([1] * 9, b"x" * 9, PayloadError, "9 messages; max_batch is 8"),
        ([2, 2], b"abc", PayloadError, "lens add up to 4 bytes, data has 3"),
    ],
)
def test_process_packed_refuses_bad_lens_and_data_with_library_errors(lens, data, error, match):
    """Not numpy's OverflowError / broadcast errors, and no silent truncation of float sizes."""
    with BatchProcessor(slot_bytes=16, max_batch=8, backend="numpy") as proc:
        with pytest.raises(error, match=match):
            proc.process_packed(lens, data)
        assert proc.batches == 0  # refused before anything ran
        lens_ok, out = proc.process_packed(np.array([1, 2], np.int64), np.frombuffer(b"abc", np.uint8))
        assert lens_ok.dtype == np.uint32 and lens_ok.tolist() == [1, 2] and bytes(out) == b"abc"


def test_failed_is_in_the_flat_namespace():
    """docs/api.md: check lengths == FAILED; everything there is importable from gpuq_driver."""
    import gpuq_driver

    assert gpuq_driver.FAILED is FAILED == 0xFFFFFFFF and "FAILED" in gpuq_driver.__all__


def test_the_old_import_paths_still_work():
    """BatchProcessor moved to gpuq_driver.batch; gpuq_driver.streams(.processor) re-export it."""
    import gpuq_driver
    from gpuq_driver import batch, streams
    from gpuq_driver.streams import processor, wire

    assert gpuq_driver.BatchProcessor is streams.BatchProcessor is processor.BatchProcessor is batch.BatchProcessor
    assert wire.FAILED is processor.FAILED is batch.FAILED == 0xFFFFFFFF
