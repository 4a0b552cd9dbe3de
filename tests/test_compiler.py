"""NVRTC compile of every device source (no GPU needed) and the on-disk CUBIN cache."""

import shutil

import pytest

from gpuq_driver import CompileError, CompileOptions, ConfigError, GpuqError, compiler


@pytest.fixture
def src_copy(tmp_path, monkeypatch):
    """A private copy of device_src that a test may edit."""
    dst = tmp_path / "device_src"
    shutil.copytree(compiler.DEVICE_SRC, dst)
    monkeypatch.setattr(compiler, "DEVICE_SRC", dst)
    compiler.include_dirs.cache_clear()
    yield dst
    compiler.include_dirs.cache_clear()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", [p.name for p in compiler.kernel_sources()])
@pytest.mark.parametrize("plugin", compiler.plugins())
def test_every_source_compiles_to_cubin(source, arch, plugin, monkeypatch):
    monkeypatch.setenv("GPUQ_CACHE_DIR", "off")
    cubin = compiler.compile_cubin(source, CompileOptions(arch=arch, plugin=plugin))
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


def test_kernel_sources_are_the_four_translation_units():
    names = [p.name for p in compiler.kernel_sources()]
    assert names == ["gpuq_batch.cu", "gpuq_bench.cu", "gpuq_pcie_probe.cu", "gpuq_queue.cu"]
    assert {"echo", "crc32c"} <= set(compiler.plugins())


def test_cache_miss_then_hit(cache, counted):
    a = compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    b = compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    assert a == b and len(counted) == 1
    assert len(list(cache.glob("*.cubin"))) == 1
    compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_80"))  # another arch: a miss
    compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90", extra=("-lineinfo",)))  # other options
    assert len(counted) == 3 and len(list(cache.glob("*.cubin"))) == 3
    assert not list(cache.glob(".tmp-*"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_entry_is_ignored_and_rebuilt(cache, counted, damage):
    good = compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    (entry,) = cache.glob("*.cubin")
    blob = entry.read_bytes()
    entry.write_bytes(
        {
            "truncate": blob[: len(blob) // 2],
            "flip": blob[:-1] + bytes([blob[-1] ^ 0xFF]),
            "empty": b"",
            "garbage": b"not a cubin at all" * 10,
        }[damage]
    )
    again = compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    assert again == good and len(counted) == 2
    assert entry.read_bytes() == blob  # the rebuilt entry replaced the corrupt one


def test_cache_can_be_disabled(monkeypatch, tmp_path, counted):
    monkeypatch.setenv("GPUQ_CACHE_DIR", "off")
    assert compiler.cache_dir() is None
    compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))
    assert len(counted) == 2


def test_default_cache_dir_is_versioned_user_cache(monkeypatch):
    monkeypatch.delenv("GPUQ_CACHE_DIR", raising=False)
    d = compiler.cache_dir()
    assert d.name == compiler.CACHE_FORMAT and "gpuq_driver" in str(d)


def test_editing_a_header_changes_the_key(src_copy, cache, counted):
    opts = CompileOptions(arch="sm_90")
    key = compiler.cache_key("gpuq_batch.cu", opts)
    (src_copy / "plugins" / "echo.cuh").write_text((src_copy / "plugins" / "echo.cuh").read_text() + "\n// edit\n")
    assert compiler.cache_key("gpuq_batch.cu", opts) != key


def test_compile_error_has_the_whole_log_and_the_source(src_copy, cache):
    (src_copy / "plugins" / "broken.cuh").write_text(
        "__device__ uint32_t gpuq_process(const uint8_t* in, uint32_t len, uint8_t* out, uint32_t cap,\n"
        "                                 uint64_t id, uint32_t lane) { return undefined_name; }\n"
    )
    with pytest.raises(CompileError) as info:
        compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin="broken"))
    e = info.value
    assert e.source == "gpuq_batch.cu" and "undefined_name" in e.log and "plugins/broken.cuh(2)" in e.log
    assert "--gpu-architecture=sm_90" in e.options and "gpuq_batch.cu" in str(e)
    assert not list(cache.glob("*.cubin"))


def test_virtual_arch_gives_no_cubin_and_is_an_error(cache):
    with pytest.raises(CompileError, match="empty CUBIN"):
        compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="compute_90"))


def test_unknown_plugin_and_source(cache):
    with pytest.raises(ConfigError, match=r"plugin='nope' is unknown: there are \['crc32c', 'echo'"):
        compiler.compile_cubin("gpuq_batch.cu", CompileOptions(plugin="nope"))
    with pytest.raises(GpuqError, match="no kernel source"):
        compiler.compile_cubin("missing.cu", CompileOptions())
