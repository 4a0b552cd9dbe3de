"""Plugins (gpuq_driver/plugins.py): lookup by name or object, entry points, twins, NVRTC of a user's
source (its errors by the user's own lines), the cache key, and the device's rules on the simulator.

Runs without a GPU: the simulator runs the twins, NVRTC compiles to CUBIN. The tests that take
``make_queue`` run on the real kernel too where a GPU exists; those taking ``gpu`` only there.
"""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from gpuq_driver import (
    BatchProcessor,
    CompileError,
    CompileOptions,
    ConfigError,
    GpuQueue,
    ProtocolError,
    QueueConfig,
    compiler,
)
from gpuq_driver.batch import FAILED
from gpuq_driver.layout import ERR_BAD_RESULT
from gpuq_driver.plugins import ENTRY_POINT_GROUP, Plugin, available, crc32c_twin, echo_twin, resolve

# The payload three times; a payload longer than out_cap / 3 returns too long a length (on purpose,
# writing nothing): a plugin that breaks the contract, as in issue 8 ("48 bytes from a 16-byte slot").
TRIPLE_SOURCE = """\
__device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                 uint8_t* __restrict__ out, uint32_t out_cap,
                                                 uint64_t msg_id, uint32_t lane) {
  (void)msg_id;
  if (3u * len > out_cap) return 3u * len;
  for (uint32_t i = lane; i < 3u * len; i += 32u) out[i] = in[i % len];
  return 3u * len;
}
"""


def triple_twin(payload, msg_id):
    return bytes(payload) * 3


TRIPLE = Plugin.from_source("triple", TRIPLE_SOURCE, twin=triple_twin)


def random_payloads(n: int, max_len: int, seed: int) -> list[bytes]:
    """n random payloads of 0 .. max_len bytes; the edge lengths first."""
    rng = np.random.default_rng(seed)
    edges = [0, 1, 3, 4, 15, 16, 17, 31, 32, 33, 511, 512, 513, max_len - 1, max_len]
    lens = [m for m in edges if m <= max_len] + rng.integers(0, max_len + 1, n).tolist()
    return [rng.integers(0, 256, m, dtype=np.uint8).tobytes() for m in lens[:n]]


# -- lookup --------------------------------------------------------------------------------------


def test_builtins_are_found_by_name_with_their_twins():
    assert {"echo", "crc32c"} <= set(available())
    echo, crc = resolve("echo"), resolve("crc32c")
    assert (echo.twin, crc.twin) == (echo_twin, crc32c_twin)
    assert crc.origin == "plugins/crc32c.cuh" and "gpuq_process" in crc.source
    assert resolve(TRIPLE) is TRIPLE
    assert repr(crc) == "<Plugin crc32c from plugins/crc32c.cuh, crc32c_twin>"


@pytest.mark.parametrize(
    "plugin, message",
    [
        ("nope", r"plugin='nope' is unknown: there are \[.*'crc32c', 'echo'.*\]"),
        ("../etc/passwd", "plugin='../etc/passwd' must be a plugin name"),
        (3, "plugin=3 must be a plugin name such as 'echo', or a gpuq_driver.plugins.Plugin"),
    ],
)
def test_unknown_or_bad_plugins_are_refused_naming_the_field(plugin, message):
    for make in (lambda: QueueConfig(plugin=plugin), lambda: BatchProcessor(plugin=plugin, backend="numpy")):
        with pytest.raises(ConfigError, match=message):
            make()


def test_queue_config_takes_a_name_or_a_plugin():
    assert QueueConfig(plugin="crc32c").plugin == "crc32c"
    c = QueueConfig(plugin=TRIPLE, backend="sim")
    assert c.plugin is TRIPLE and "<Plugin triple from triple.cuh, triple_twin>" in repr(c)


def test_a_plugin_without_a_twin_is_refused_where_the_twin_would_run():
    gpu_only = Plugin.from_source("gpu_only", TRIPLE_SOURCE)
    QueueConfig(plugin=gpu_only)  # fine for the GPU
    with pytest.raises(
        ConfigError, match=r"plugin='gpu_only' has no Python twin, which the simulator \(backend='sim'\)"
    ):
        QueueConfig(plugin=gpu_only, backend="sim")
    with pytest.raises(ConfigError, match="plugin='gpu_only' has no Python twin, which BatchProcessor's NumPy path"):
        BatchProcessor(plugin=gpu_only, backend="numpy")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Plugin("not a name", TRIPLE_SOURCE), "Plugin name='not a name' must be an identifier"),
        (lambda: Plugin("p", b"bytes"), "source must be a str, not bytes"),
        (lambda: Plugin("p", "int main() {}"), "does not define gpuq_process"),
        (lambda: Plugin("p", TRIPLE_SOURCE, twin="echo"), "twin must be callable"),
        (lambda: Plugin.from_file("/no/such/plugin.cuh"), "plugin file '/no/such/plugin.cuh' cannot be read"),
    ],
)
def test_plugin_construction_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_file_name_that_is_not_an_identifier_asks_for_name(tmp_path):
    path = tmp_path / "my-plugin.cuh"
    path.write_text(TRIPLE_SOURCE)
    with pytest.raises(ConfigError, match=r"its name would be 'my-plugin' \(from the file name\).*pass name="):
        Plugin.from_file(path)
    assert Plugin.from_file(path, name="my_plugin").name == "my_plugin"


def test_a_twin_returning_something_not_bytes_like_is_a_type_error():
    p = Plugin.from_source("bad_twin", TRIPLE_SOURCE, twin=lambda payload, msg_id: 48)
    with pytest.raises(TypeError, match="plugin 'bad_twin': the twin returned int, not a bytes-like object"):
        p.run_twin(memoryview(b"x"), 0)


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry points name plugins (as `pip install` would leave it)."""
    module = "gpuq_test_triple_plugin"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""\
            from gpuq_driver.plugins import Plugin

            TRIPLE = Plugin.from_source("triple", {TRIPLE_SOURCE!r}, twin=lambda p, m: bytes(p) * 3)

            def make():
                return Plugin.from_source("factory", {TRIPLE_SOURCE!r}, twin=lambda p, m: bytes(p) * 3)
            """
        )
    )
    dist = tmp_path / "gpuq_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gpuq-test-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        f"triple = {module}:TRIPLE\n"
        f"factory = {module}:make\n"
        f"misnamed = {module}:TRIPLE\n"
        f"not-a-name = {module}:TRIPLE\n"
        "missing = gpuq_test_no_such_module:PLUGIN\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield module
    sys.modules.pop(module, None)


def test_entry_point_plugins_are_found_by_name_and_imported_only_then(installed_plugins):
    assert {"crc32c", "echo", "factory", "missing", "misnamed", "triple"} <= set(available())
    assert "not-a-name" not in available()  # never loadable: a Plugin's name is an identifier
    assert installed_plugins not in sys.modules  # listing imports nothing
    triple = resolve("triple")
    assert triple.name == "triple" and installed_plugins in sys.modules
    assert resolve("factory").name == "factory"  # a function returning a Plugin
    with pytest.raises(ConfigError, match=r"plugin='missing' \(entry point .*\) failed to load: ModuleNotFoundError"):
        resolve("missing")
    with pytest.raises(ConfigError, match="plugin='misnamed' .* is named 'triple'"):
        resolve("misnamed")
    with GpuQueue(QueueConfig(capacity=8, slot_bytes=64, plugin="triple", backend="sim")) as q:
        assert q.wait_result(q.enqueue(b"ab")) == b"ababab"


# -- NVRTC: the user's source, its errors and the cache key ----------------------------------------


@pytest.mark.parametrize("source", ["gpuq_queue.cu", "gpuq_batch.cu"])
def test_a_plugin_file_anywhere_compiles_to_cubin(tmp_path, cache, source):
    path = tmp_path / "elsewhere" / "triple.cuh"
    path.parent.mkdir()
    path.write_text(TRIPLE_SOURCE)
    plugin = Plugin.from_file(path, twin=triple_twin)
    assert (plugin.name, plugin.origin) == ("triple", str(path))
    cubin = compiler.compile_cubin(source, CompileOptions(arch="sm_90", plugin=plugin))
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


def test_a_plugin_file_is_one_file_its_folder_is_not_on_the_include_path(tmp_path, cache):
    """docs/api.md: a sibling header cannot be included (the cache key covers the plugin's text
    only); NVRTC says so at the user's file and line."""
    (tmp_path / "helper.cuh").write_text("__device__ __forceinline__ uint32_t helper() { return 0u; }\n")
    path = tmp_path / "with_helper.cuh"
    path.write_text('#include "helper.cuh"\n' + TRIPLE_SOURCE)
    with pytest.raises(
        CompileError, match=r'with_helper\.cuh\(1\): catastrophic error: cannot open source file "helper'
    ):
        compiler.compile_cubin("gpuq_queue.cu", CompileOptions(arch="sm_90", plugin=Plugin.from_file(path)))


def test_a_syntax_error_is_reported_at_the_users_own_file_and_line(tmp_path, cache):
    path = tmp_path / "my_plugin.cuh"
    lines = TRIPLE_SOURCE.splitlines()
    lines[4] = "  if (3u * len > out_cap) return 3u * len"  # line 5: the ';' is missing
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CompileError) as info:
        compiler.compile_cubin("gpuq_queue.cu", CompileOptions(arch="sm_90", plugin=Plugin.from_file(path)))
    e = info.value
    assert f'{path}(6): error: expected a ";"' in e.log  # NVRTC notices it at the next token, line 6
    assert e.plugin.name == "my_plugin" and f"with plugin 'my_plugin' ({path})" in str(e)
    source_error = Plugin.from_source("typo", "// line 1\n__device__ uint32_t gpuq_process() { return nope; }\n")
    with pytest.raises(CompileError, match=r"typo\.cuh\(2\): error: identifier \"nope\" is undefined"):
        compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin=source_error))
    assert not list(cache.glob("*.cubin"))


def test_the_cache_key_covers_the_plugin_source(cache, counted):
    key = lambda plugin: compiler.cache_key("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin=plugin))
    edited = Plugin.from_source("triple", TRIPLE_SOURCE.replace("3u", "3U"), twin=triple_twin)
    assert key(TRIPLE) != key(edited)
    assert key(TRIPLE) == key(Plugin.from_source("triple", TRIPLE_SOURCE))  # same source, same key
    assert key("echo") == key(resolve("echo")) != key("crc32c")
    for plugin in (TRIPLE, edited, Plugin.from_source("triple", TRIPLE_SOURCE), edited):
        compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin=plugin))
    assert len(counted) == 2  # a changed plugin recompiles; an unchanged one comes from the cache


# -- crc32c --------------------------------------------------------------------------------------


def test_crc32c_twin_known_values():
    assert crc32c_twin(memoryview(b"123456789"), 0) == (0xE3069283).to_bytes(4, "little")  # the check value
    assert crc32c_twin(memoryview(b""), 0) == bytes(4)
    assert crc32c_twin(memoryview(bytes(32)), 0) == (0x8A9136AA).to_bytes(4, "little")  # RFC 3720 B.4


def test_crc32c_twin_matches_the_crc32c_package():
    crc32c = pytest.importorskip("crc32c", reason="the crc32c package (in the [test] extra) is not installed")
    for i, payload in enumerate(random_payloads(400, 4096, seed=1) + [os.urandom(1 << 16)]):
        assert crc32c_twin(memoryview(payload), i) == crc32c.crc32c(payload).to_bytes(4, "little"), len(payload)


def test_crc32c_through_the_queue(make_queue):
    q = make_queue(capacity=64, slot_bytes=512, plugin="crc32c")
    payloads = random_payloads(300, 512, seed=2)
    ids = []
    for p in payloads:
        ids.append(q.enqueue(p))
        if len(ids) % 32 == 0:
            for m in ids[-32:]:
                assert q.wait_result(m) == crc32c_twin(memoryview(payloads[m]), m), len(payloads[m])
    for m in ids[len(ids) // 32 * 32 :]:
        assert q.wait_result(m) == crc32c_twin(memoryview(payloads[m]), m)


def test_crc32c_in_batch_processor_numpy():
    payloads = random_payloads(100, 256, seed=3)
    with BatchProcessor(slot_bytes=256, max_batch=128, plugin="crc32c", backend="numpy") as proc:
        assert proc.process(payloads) == [crc32c_twin(memoryview(p), 0) for p in payloads]
        assert "plugin=crc32c" in repr(proc)


# -- the device's rules, on both backends -----------------------------------------------------------


def test_a_result_longer_than_the_slot_is_bad_result_and_writes_nothing(make_queue):
    q = make_queue(capacity=4, slot_bytes=16, plugin=TRIPLE)
    res_data = q._kernel.layout.view(q._kernel.mem, "res_data")
    before = bytes(res_data[16:64])  # the result slots after the first
    bad = q.enqueue(b"0123456789abcdef")  # 48 bytes from a 16-byte slot
    with pytest.raises(ProtocolError, match=f"msg_id {bad}: device reported BAD_RESULT"):
        q.wait_result(bad)
    assert bytes(res_data[16:64]) == before  # nothing past the slot
    assert q._kernel.error == (ERR_BAD_RESULT, bad)
    good = q.enqueue(b"xyz")  # the queue goes on
    assert q.wait_result(good) == b"xyzxyzxyz"
    del res_data
    with pytest.raises(ProtocolError, match=f"device reported BAD_RESULT at msg_id {bad}"):
        q.close()  # the first protocol error is reported once more at the end, as on the device


def test_batch_processor_numpy_fails_a_result_longer_than_the_slot():
    with BatchProcessor(slot_bytes=16, max_batch=4, plugin=TRIPLE, backend="numpy") as proc:
        lens, out = proc.process_packed([16, 3], b"0123456789abcdef" + b"xyz")
        assert lens.tolist() == [FAILED, 9] and bytes(out) == b"xyzxyzxyz"


# -- on the GPU only: the device code against the twin ------------------------------------------------


@pytest.fixture(scope="module")
def crc_messages():
    """100,000 random payloads of 0 .. 256 bytes and their CRC-32C by the twin."""
    payloads = random_payloads(100_000, 256, seed=8)
    return payloads, [crc32c_twin(memoryview(p), 0) for p in payloads]


def first_mismatch(got, expect, payloads):
    for i, (g, e) in enumerate(zip(got, expect)):
        if g != e:
            return f"message {i} ({len(payloads[i])} bytes): device {g.hex()}, twin {e.hex()}"
    return None


def test_crc32c_on_the_gpu_matches_the_twin_through_gpuqueue(gpu, crc_messages):
    payloads, expect = crc_messages
    got = []
    with GpuQueue(QueueConfig(capacity=4096, slot_bytes=256, plugin="crc32c")) as q:
        for start in range(0, len(payloads), 2048):
            ids = [q.enqueue(p) for p in payloads[start : start + 2048]]
            got += [q.wait_result(m, timeout=10.0) for m in ids]
    assert len(got) == len(expect) and first_mismatch(got, expect, payloads) is None


def test_crc32c_on_the_gpu_matches_the_twin_through_batch_processor(gpu, crc_messages):
    payloads, expect = crc_messages
    got = []
    with BatchProcessor(slot_bytes=256, max_batch=4096, plugin="crc32c", backend="cuda") as proc:
        for start in range(0, len(payloads), 4096):
            got += proc.process(payloads[start : start + 4096])
    assert len(got) == len(expect) and first_mismatch(got, expect, payloads) is None


def test_a_twin_that_raises_stops_the_simulated_kernel_for_good():
    """Like a device plugin that faults: no hang; the messages before it come back, the waiters of
    the rest get KernelFault (a KernelStopped) at once, and the queue still closes (tests/test_faults.py
    has the rest)."""
    import warnings

    from gpuq_driver import GpuQueue, KernelFault

    def fragile(payload, msg_id):
        if msg_id == 3:
            raise ZeroDivisionError("boom")
        return payload

    plugin = Plugin.from_source("fragile", TRIPLE_SOURCE, twin=fragile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the simulator says so from its thread
        q = GpuQueue(QueueConfig(capacity=8, slot_bytes=16, backend="sim", plugin=plugin))
        ids = [q.enqueue(bytes([i])) for i in range(6)]
        assert [q.wait_result(i, timeout=5) for i in ids[:3]] == [b"\0", b"\1", b"\2"]
        for i in ids[3:]:
            with pytest.raises(KernelFault, match="ZeroDivisionError"):
                q.wait_result(i, timeout=5)
        assert isinstance(q._kernel.fault, ZeroDivisionError) and q.stats().kernel == "faulted"
        q.close()
