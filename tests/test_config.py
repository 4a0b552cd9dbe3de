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
        ({"one_read": True, "scouts": 5}, "scouts=5 is out of range: 0 <= scouts <= 4"),
        ({"scouts": "1"}, "scouts must be an int, not str"),
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


def test_numpy_bools_are_bools():
    """one_read=np.True_ (a numpy comparison's result) is True, as numpy integers are ints; an int
    still is not a bool."""
    import numpy as np

    c = QueueConfig(one_read=np.True_)
    assert c.one_read is True and QueueConfig(one_read=np.False_).one_read is False
    with pytest.raises(ConfigError, match="one_read=1 must be True or False"):
        QueueConfig(one_read=1)


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


# -- the grid against the kernel's occupancy (kernel.grid_blocks; the GPU's numbers faked here) -----


def fake_occupancy(max_threads: int, per_sm_at_32: int = 16):
    """Blocks of t threads one SM holds for a kernel whose registers allow ``max_threads`` a block."""
    return lambda t: 0 if t > max_threads else max(1, per_sm_at_32 * 32 // t)


def test_a_block_too_large_names_the_largest_that_fits():
    """1,024-thread blocks do not fit the queue kernel (more than 64 registers a thread): the error
    names threads_per_block and the largest block that does fit, not only 'not even one'."""
    from gpuq_driver.kernel import grid_blocks

    with pytest.raises(ConfigError, match=r"threads_per_block=1024: .* threads_per_block <= 896 fits"):
        grid_blocks(None, 1024, fake_occupancy(896), 132, "H200")
    with pytest.raises(ConfigError, match=r"threads_per_block=960: .* threads_per_block <= 896 fits"):
        grid_blocks(None, 960, fake_occupancy(896), 132, "H200")
    assert grid_blocks(None, 256, fake_occupancy(896), 132, "H200") == 132  # one block per SM
    assert grid_blocks(7, 256, fake_occupancy(896), 132, "H200") == 7
    with pytest.raises(ConfigError, match=r"blocks=65535: .* fits at most 264 blocks on H200 \(2 per SM x 132 SMs\)"):
        grid_blocks(65535, 256, fake_occupancy(896), 132, "H200")
