"""QueueConfig validation: every bad field is refused with its name and its limit."""

import pytest

from gpuq_driver import ConfigError, QueueConfig


def test_defaults_are_valid():
    c = QueueConfig()
    assert (c.capacity, c.slot_bytes, c.plugin, c.backend) == (1024, 512, "echo", "cuda")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"capacity": 1000}, "capacity=1000 must be a power of two"),
        ({"capacity": 1}, "capacity=1 is out of range: 2 <= capacity <= 4194304"),
        ({"capacity": 1 << 23}, "capacity=8388608 is out of range"),
        ({"capacity": 2.0}, "capacity must be an int, not float"),
        ({"capacity": True}, "capacity must be an int, not bool"),
        ({"slot_bytes": 100}, "slot_bytes=100 must be a multiple of 16"),
        ({"slot_bytes": 0}, "slot_bytes=0 is out of range: 16 <= slot_bytes <= 1048576"),
        ({"slot_bytes": 1 << 21}, "slot_bytes=2097152 is out of range"),
        ({"capacity": 1 << 22, "slot_bytes": 2048}, "capacity*slot_bytes=8589934592 exceeds 4294967296 bytes"),
        ({"threads_per_block": 48}, "threads_per_block=48 must be a multiple of 32"),
        ({"threads_per_block": 2048}, "threads_per_block=2048 is out of range: 32 <= threads_per_block <= 1024"),
        ({"blocks": 0}, "blocks=0 is out of range: 1 <= blocks <= 65535"),
        (
            {"enqueue_timeout_s": -1},
            "enqueue_timeout_s=-1 must be a number of seconds: enqueue_timeout_s >= 0, or math.inf",
        ),
        ({"shutdown_timeout_s": "5"}, "shutdown_timeout_s='5' must be a number of seconds"),
        ({"front_backoff_ns": 2_000_000}, "front_backoff_ns=2000000 is out of range: 0 <= front_backoff_ns <= 1000000"),
        ({"idle_backoff_ns": -5}, "idle_backoff_ns=-5 is out of range"),
        ({"device": -1}, "device=-1 is out of range"),
        ({"plugin": "../etc/passwd"}, "plugin='../etc/passwd' must be a plugin name"),
        ({"backend": "opencl"}, "backend='opencl' must be 'cuda' or 'sim'"),
    ],
)
def test_bad_fields_are_named_with_their_limit(fields, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        QueueConfig(**fields)


def test_numpy_integers_are_ints():
    import numpy as np

    c = QueueConfig(capacity=np.int64(8), slot_bytes=np.uint32(32))
    assert (c.capacity, c.slot_bytes) == (8, 32) and type(c.capacity) is int


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        QueueConfig(capacity=3)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        QueueConfig().capacity = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, bad",
    [
        ("slot_bytes", 100),
        ("slot_bytes", 0),
        ("slot_bytes", 1 << 21),
        ("slot_bytes", 64.0),
        ("threads_per_block", 48),
        ("threads_per_block", 2048),
    ],
)
def test_the_queue_and_the_batch_path_share_one_geometry_rule(field, bad):
    """QueueConfig and BatchProcessor refuse the same slot size / block size with the same words."""
    from gpuq_driver import BatchProcessor

    with pytest.raises(ConfigError) as queue_error:
        QueueConfig(**{field: bad})
    with pytest.raises(ConfigError) as batch_error:
        BatchProcessor(**{field: bad}, backend="numpy")
    assert str(queue_error.value) == str(batch_error.value) and field in str(queue_error.value)
