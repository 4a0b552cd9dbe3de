"""Moved: BatchProcessor lives in :mod:`gpuq_driver.batch` (``from gpuq_driver import BatchProcessor``).
This name stays importable for existing code."""

from ..batch import FAILED, BatchProcessor

__all__ = ["FAILED", "BatchProcessor"]
