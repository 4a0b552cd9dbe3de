"""Precompiled plugins (Plugin.from_object): the kind told by the bytes, nvJitLink linking LTO-IR,
PTX, CUBIN, fatbin, nvcc -dc objects and libraries into the kernels, its errors, the cache key.

Runs without a GPU wherever NVRTC and nvJitLink are usable (the objects are made here by NVRTC,
and by nvcc where one is installed); each test that needs one of them skips with the reason where
it is missing.  The tests that take ``gpu`` run the linked kernels on the device and check every
result against the plugin's NumPy twin.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuq_driver import (
    BatchProcessor,
    CompileError,
    CompileOptions,
    ConfigError,
    GpuqError,
    GpuQueue,
    QueueConfig,
    compiler,
)
from gpuq_driver.errors import check
from gpuq_driver.plugins import EXTERN_HEADER, Plugin, detect_kind, object_arches

# The result is the payload reversed, each byte xor'ed with a key from msg_id: wrong order, a
# wrong msg_id or a missed byte all show.  Compiles with NVRTC and with nvcc.
XOR_REVERSE_SOURCE = f"""\
#include "{EXTERN_HEADER}"

extern "C" __device__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                            uint8_t* __restrict__ out, uint32_t out_cap,
                                            uint64_t msg_id, uint32_t lane) {{
  (void)out_cap;  // len <= out_cap always: the result fits its slot
  const uint8_t key = static_cast<uint8_t>(0x5Au ^ static_cast<uint32_t>(msg_id & 0xFFu));
  for (uint32_t i = lane; i < len; i += 32u) out[i] = static_cast<uint8_t>(in[len - 1u - i] ^ key);
  return len;
}}
"""


def xor_reverse_twin(payload, msg_id: int) -> bytes:
    """The NumPy twin of XOR_REVERSE_SOURCE."""
    key = np.uint8(0x5A ^ (msg_id & 0xFF))
    return (np.frombuffer(payload, np.uint8)[::-1] ^ key).tobytes()


# The same function with C++ linkage: its symbol is mangled, so the kernel's extern "C" reference
# stays undefined.
CPP_LINKAGE_SOURCE = XOR_REVERSE_SOURCE.replace('extern "C" __device__', "__device__").replace(
    f'#include "{EXTERN_HEADER}"', "#include <cuda/std/cstdint>\nusing namespace cuda::std;"
)
WRONG_NAME_SOURCE = XOR_REVERSE_SOURCE.replace("gpuq_process(", "gpuq_process_v2(")  # gpuq_process never defined

NVRTC_KINDS = ("ltoir", "ptx", "cubin")

# A precompiled plugin that uses the plugin API across the link: the queue's params (gpuq_params_g,
# defined by the kernel) as an xor key, and GPUQ_FAIL for a 3-byte payload (code 7).
PARAMS_XOR_SOURCE = f"""\
#include "{EXTERN_HEADER}"

extern "C" __device__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                            uint8_t* __restrict__ out, uint32_t out_cap,
                                            uint64_t msg_id, uint32_t lane) {{
  (void)out_cap;
  if (len == 3u) return GPUQ_FAIL(7);
  const uint8_t* key = gpuq_params();
  const uint64_t n = gpuq_params_bytes();
  for (uint32_t i = lane; i < len; i += 32u) out[i] = static_cast<uint8_t>(in[i] ^ (n ? key[(msg_id + i) % n] : 0u));
  return len;
}}
"""


def params_xor_twin(payload, msg_id: int, params) -> bytes:
    """The twin of PARAMS_XOR_SOURCE."""
    from gpuq_driver.plugins import Fail

    if len(payload) == 3:
        raise Fail(7)
    key = np.frombuffer(params, np.uint8)
    data = np.frombuffer(payload, np.uint8)
    if not len(key):
        return data.tobytes()
    return (data ^ key[(msg_id + np.arange(len(data))) % len(key)]).tobytes()


def random_payloads(n: int, max_len: int, seed: int) -> list[bytes]:
    """n random payloads of 0 .. max_len bytes; the edge lengths first."""
    rng = np.random.default_rng(seed)
    edges = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, max_len - 1, max_len]
    lens = [m for m in edges if m <= max_len] + rng.integers(0, max_len + 1, n).tolist()
    return [rng.integers(0, 256, m, dtype=np.uint8).tobytes() for m in lens[:n]]


# -- making objects: NVRTC (always here) and nvcc (where installed) --------------------------------


def nvrtc_object(source: str, kind: str, arch: str = "sm_90") -> bytes:
    """The plugin ``source`` compiled by NVRTC to relocatable ``kind``: "ltoir" (-dlto), "ptx", "cubin"."""
    from cuda.bindings import nvrtc

    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-rdc=true", *(f"-I{d}" for d in compiler.include_dirs())]
    if kind == "ltoir":
        opts.append("-dlto")
    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), b"plugin.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if int(result[0]) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise AssertionError(f"NVRTC could not compile the test plugin: {log.decode(errors='replace')}")
        get_size, get = {
            "ltoir": (nvrtc.nvrtcGetLTOIRSize, nvrtc.nvrtcGetLTOIR),
            "ptx": (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX),
            "cubin": (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN),
        }[kind]
        out = b" " * int(check(get_size(prog), "size"))
        check(get(prog, out), "get")
        return out.rstrip(b"\0") if kind == "ptx" else out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    roots = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    for cand in (shutil.which("nvcc"), *(os.path.join(r, "bin", "nvcc") for r in roots if r)):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


# The commands docs/api.md gives ("Precompiled plugins"), by kind, for -arch={arch}; {out} the file.
NVCC_COMMANDS = {
    "ltoir": "-arch={arch} -dlto -ltoir plugin.cu -o {out}",
    "object": "-arch={arch} -dlto -dc plugin.cu -o {out}",
    "fatbin_lto": "-arch=lto_{num} -dlto -fatbin plugin.cu -o {out}",
    "cubin": "-arch={arch} -rdc=true -cubin plugin.cu -o {out}",
    "ptx": "-arch={arch} -rdc=true -ptx plugin.cu -o {out}",
    "fatbin": "-arch={arch} -rdc=true -fatbin plugin.cu -o {out}",
    "library": "-arch={arch} -rdc=true -lib plugin.cu -o {out}",
}
NVCC_KIND = {"fatbin_lto": "fatbin"}  # the kind detect_kind gives, where it is not the key itself


class Nvcc:
    """Builds XOR_REVERSE_SOURCE with nvcc, as docs/api.md says, into a folder of its own."""

    def __init__(self, exe: str, folder: Path):
        self.exe, self.folder = exe, folder
        (folder / "plugin.cu").write_text(XOR_REVERSE_SOURCE)

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        cmd = [self.exe, f"-I{compiler.DEVICE_SRC}", *args]
        return subprocess.run(cmd, cwd=self.folder, capture_output=True, text=True, timeout=300)

    def build(self, what: str, arch: str) -> Path:
        out = self.folder / f"plugin_{what}_{arch}.{NVCC_KIND.get(what, what)}"
        args = NVCC_COMMANDS[what].format(arch=arch, num=arch.split("_")[1], out=out.name).split()
        r = self.run(args)
        assert r.returncode == 0, f"nvcc {' '.join(args)} failed:\n{r.stdout}{r.stderr}"
        return out


@pytest.fixture(scope="module")
def nvcc(tmp_path_factory):
    """An Nvcc; skips with the reason where nvcc is missing or cannot compile here (no host compiler)."""
    exe = find_nvcc()
    if exe is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin): a CUDA toolkit is needed")
    made = Nvcc(exe, tmp_path_factory.mktemp("nvcc"))
    (made.folder / "probe.cu").write_text("__device__ int gpuq_probe;\n")
    r = made.run(["-arch=sm_80", "-rdc=true", "-ptx", "probe.cu", "-o", "probe.ptx"])
    if r.returncode != 0:
        pytest.skip(f"{exe} cannot compile here: {(r.stdout + r.stderr).strip()[:500]}")
    return made


# -- fixtures: the linker, a shared cache, counting links ------------------------------------------


@pytest.fixture(scope="module")
def linker():
    """nvJitLink's (major, minor); skips with the reason where it is missing or older than NVRTC."""
    try:
        compiler._check_linker()
    except GpuqError as exc:
        pytest.skip(str(exc))
    return compiler.nvjitlink_version()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache folder for the module's link tests: the kernel's LTO-IR is compiled once."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUQ_CACHE_DIR", str(folder))
        yield folder / compiler.CACHE_FORMAT


@pytest.fixture
def linked(monkeypatch):
    """Counts real nvJitLink links: the list of (source, plugin) of each."""
    calls = []
    real = compiler._nvjitlink_link

    def spy(source, options, ltoir):
        calls.append((source, options.plugin))
        return real(source, options, ltoir)

    monkeypatch.setattr(compiler, "_nvjitlink_link", spy)
    return calls


@pytest.fixture(scope="module")
def objects():
    """XOR_REVERSE_SOURCE made by NVRTC for sm_90, by kind."""
    return {kind: nvrtc_object(XOR_REVERSE_SOURCE, kind) for kind in NVRTC_KINDS}


def link(source: str, plugin: Plugin, arch: str = "sm_90") -> bytes:
    return compiler.compile_cubin(source, CompileOptions(arch=arch, plugin=plugin))


KERNEL_OF = {"gpuq_queue.cu": b"gpuq_layout_probe", "gpuq_batch.cu": b"gpuq_batch"}  # and gpuq_persistent


# -- the kind, from the bytes ---------------------------------------------------------------------


def test_the_kind_is_told_by_the_bytes(objects):
    assert {kind: detect_kind(data) for kind, data in objects.items()} == {k: k for k in NVRTC_KINDS}
    elf_host = b"\x7fELF\x02\x01\x01\x00" + bytes(10) + struct.pack("<H", 62) + bytes(44)  # x86-64 relocatable
    assert detect_kind(elf_host) == "object"
    assert detect_kind(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 0)) == "fatbin"
    assert detect_kind(b"!<arch>\n/               ") == "library"
    assert detect_kind(b"not an object") is None and detect_kind(b"") is None
    assert object_arches("cubin", objects["cubin"]) == ["sm_90 (CUBIN)"]
    assert object_arches("ptx", objects["ptx"]) == ["sm_90 (PTX)"]
    assert object_arches("ltoir", objects["ltoir"]) == []  # its header does not say: nvJitLink checks


def test_from_object_takes_a_path_or_bytes(tmp_path, objects):
    path = tmp_path / "xor_reverse.ltoir"
    path.write_bytes(objects["ltoir"])
    p = Plugin.from_object(path, twin=xor_reverse_twin)
    assert (p.name, p.kind, p.origin, p.binary, p.source) == ("xor_reverse", "ltoir", str(path), objects["ltoir"], "")
    assert p.precompiled and not Plugin.from_source("s", "gpuq_process").precompiled
    assert repr(p) == f"<Plugin xor_reverse, LTO-IR of {len(objects['ltoir'])} bytes from {path}, xor_reverse_twin>"
    from_bytes = Plugin.from_object(bytearray(objects["cubin"]), name="xr")
    assert (from_bytes.kind, from_bytes.origin, from_bytes.binary) == ("cubin", "xr.cubin", objects["cubin"])
    assert Plugin.from_object(memoryview(objects["ptx"]), name="xr", kind="ptx").kind == "ptx"
    assert Plugin.from_object(str(path), name="other").name == "other"
    assert QueueConfig(plugin=p).plugin is p  # QueueConfig and BatchProcessor take it as any Plugin
    with pytest.raises(ConfigError, match="is precompiled .ltoir.: it has no source to compile"):
        p.header()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda o: Plugin.from_object(b"not an object at all", name="g"), "not a precompiled plugin nvJitLink links"),
        (lambda o: Plugin.from_object(b"", name="g"), "plugin 'g': the object is empty"),
        (lambda o: Plugin.from_object(o["ltoir"]), r"Plugin.from_object\(bytes\): give name="),
        (lambda o: Plugin.from_object(o["ltoir"], name="my-plugin"), "Plugin name='my-plugin' must be an identifier"),
        (lambda o: Plugin.from_object(o["ltoir"], name="p", kind="cubin"), "kind='cubin', but the bytes are LTO-IR"),
        (lambda o: Plugin.from_object(o["ltoir"], name="p", kind="elf"), "kind='elf' must be one of"),
        (lambda o: Plugin.from_object("/no/such/plugin.o"), "plugin object '/no/such/plugin.o' cannot be read"),
        (lambda o: Plugin.from_object(3, name="p"), "obj must be a path or bytes-like, not int"),
        (lambda o: Plugin("p", "gpuq_process", binary=b"x"), "binary is only for a precompiled kind"),
        (
            lambda o: Plugin("p", "gpuq_process", binary=o["ptx"], kind="ptx"),
            "a precompiled plugin .ptx. has no source",
        ),
        (lambda o: Plugin("p", kind="ptx"), "binary must be non-empty bytes"),
        (lambda o: Plugin("p", binary=o["ptx"], kind="text"), "kind='text' must be 'source' or one of"),
        (
            lambda o: Plugin.from_object(o["cubin"][:16] + struct.pack("<H", 2) + o["cubin"][18:], name="p"),
            r"the CUBIN is not relocatable \(built without -rdc=true\)",
        ),
    ],
)
def test_from_object_refuses_what_cannot_link(objects, make, message):
    with pytest.raises(ConfigError, match=message):
        make(objects)


def test_cuda_source_or_a_bad_file_name_given_to_from_object_says_what_to_do(tmp_path):
    source = tmp_path / "plugin.cu"
    source.write_text(XOR_REVERSE_SOURCE)
    with pytest.raises(
        ConfigError, match=r"plugin.cu: this is CUDA source, not a precompiled plugin: Plugin.from_file"
    ):
        Plugin.from_object(source)
    with pytest.raises(ConfigError, match="this is CUDA source"):
        Plugin.from_object(XOR_REVERSE_SOURCE.encode(), name="p")
    named = tmp_path / "my-plugin.v2.ltoir"
    named.write_bytes(b"irrelevant")
    with pytest.raises(ConfigError, match=r"its name would be 'my-plugin' \(from the file name\).*pass name="):
        Plugin.from_object(named)


def test_bytes_given_a_kind_they_do_not_show_have_no_arches():
    """kind='cubin' on bytes without a CUDA ELF header: no arch read from random offsets (it said
    'built for sm_55' of garbage), and a link error that says the bytes are not a CUBIN."""
    garbage = bytes(range(7, 107))
    for kind in ("cubin", "fatbin"):
        assert Plugin.from_object(garbage, name="g", kind=kind).arches() == []
    assert object_arches("cubin", garbage) == object_arches("fatbin", garbage) == []


def test_a_precompiled_plugin_without_a_twin_is_told_to_take_one_in_from_object(objects):
    plugin = Plugin.from_object(objects["ltoir"], name="xor_reverse")
    with pytest.raises(ConfigError, match=r"has no Python twin.*give one \(Plugin.from_object\(obj, twin=f\)"):
        QueueConfig(plugin=plugin, backend="sim")


def test_a_precompiled_plugin_runs_its_twin_on_the_simulator_and_numpy(objects):
    plugin = Plugin.from_object(objects["ltoir"], name="xor_reverse", twin=xor_reverse_twin)
    payloads = random_payloads(60, 64, seed=5)
    with GpuQueue(QueueConfig(capacity=16, slot_bytes=64, plugin=plugin, backend="sim")) as q:
        for p in payloads:
            m = q.enqueue(p)
            assert q.wait_result(m) == xor_reverse_twin(p, m)
    with BatchProcessor(slot_bytes=64, max_batch=64, plugin=plugin, backend="numpy") as proc:
        assert proc.process(payloads) == [xor_reverse_twin(p, i) for i, p in enumerate(payloads)]
    with pytest.raises(ConfigError, match="has no Python twin, which the simulator"):
        QueueConfig(plugin=Plugin.from_object(objects["ltoir"], name="gpu_only"), backend="sim")


# -- linking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(KERNEL_OF))
@pytest.mark.parametrize("kind", NVRTC_KINDS)
def test_each_kind_links_into_the_kernel(shared_cache, linker, objects, kind, source):
    cubin = link(source, Plugin.from_object(objects[kind], name="xor_reverse"))
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == 190 and len(cubin) > 1000
    assert KERNEL_OF[source] in cubin and (source != "gpuq_queue.cu" or b"gpuq_persistent" in cubin)
    assert list(shared_cache.glob("*.ltoir")) and list(shared_cache.glob("*.cubin"))


@pytest.mark.parametrize("kind", NVRTC_KINDS)
def test_a_plugin_using_params_and_fail_links(shared_cache, linker, kind):
    cubin = link("gpuq_queue.cu", Plugin.from_object(nvrtc_object(PARAMS_XOR_SOURCE, kind), name="params_xor"))
    assert cubin[:4] == b"\x7fELF" and b"gpuq_params_g" in cubin


def test_ptx_with_its_terminating_nul_links(shared_cache, linker, objects):
    plugin = Plugin.from_object(objects["ptx"] + b"\0", name="xor_reverse")  # as nvrtcGetPTX returns it
    assert plugin.kind == "ptx" and link("gpuq_batch.cu", plugin)


def test_the_kernel_nvrtc_compiles_for_a_precompiled_plugin_is_relocatable_ltoir(objects):
    opts = CompileOptions(arch="sm_90", plugin=Plugin.from_object(objects["ptx"], name="p")).nvrtc_options(("<inc>",))
    assert {"-rdc=true", "-dlto", f'-DGPUQ_PLUGIN_FILE="{EXTERN_HEADER}"'} <= set(opts)
    source_opts = CompileOptions(arch="sm_90").nvrtc_options(("<inc>",))
    assert "-rdc=true" not in source_opts and '-DGPUQ_PLUGIN_FILE="gpuq_plugin.cuh"' in source_opts
    assert CompileOptions(arch="sm_90").link_options() == ("-arch=sm_90", "-lto")


@pytest.mark.parametrize(
    "source_text, kind",
    [(CPP_LINKAGE_SOURCE, "cubin"), (CPP_LINKAGE_SOURCE, "ltoir"), (WRONG_NAME_SOURCE, "ptx")],
    ids=["c++-linkage-cubin", "c++-linkage-ltoir", "other-name-ptx"],
)
def test_no_extern_c_gpuq_process_is_a_link_error_that_says_so(shared_cache, linker, source_text, kind):
    plugin = Plugin.from_object(nvrtc_object(source_text, kind), name="unlinked")
    with pytest.raises(CompileError) as info:
        link("gpuq_batch.cu", plugin)
    e = info.value
    assert e.tool == "nvJitLink" and e.plugin is plugin and e.options == ("-arch=sm_90", "-lto")
    assert "does not define gpuq_process with C linkage" in e.log and "gpuq_process" in e.log.split("\n", 2)[2]
    assert str(e).startswith(f"nvJitLink failed to link gpuq_batch.cu with plugin 'unlinked' ({kind} from unlinked.")


def test_garbage_of_a_given_kind_is_a_link_error_with_the_log(shared_cache, linker):
    plugin = Plugin.from_object(b"\x00garbage, not LTO-IR" * 8, name="garbage", kind="ltoir")
    with pytest.raises(CompileError, match=r"the bytes are not LTO-IR \('ltoir'\)") as info:
        link("gpuq_queue.cu", plugin)
    assert "NVJITLINK_INPUT_LTOIR" in info.value.log  # nvJitLink's own words follow
    cubin = Plugin.from_object(bytes(range(7, 107)), name="garbage", kind="cubin")
    with pytest.raises(CompileError) as info:
        link("gpuq_queue.cu", cubin)
    assert "is built for" not in str(info.value)  # not an arch read from random bytes
    assert not list(shared_cache.glob(f"{compiler.cache_key('gpuq_queue.cu', CompileOptions(plugin=plugin))}*"))


@pytest.mark.parametrize(
    "kind, built, message",
    [
        ("cubin", "sm_80", r"is built for sm_80 \(CUBIN\), the link is for sm_90: rebuild it with -arch=sm_90"),
        ("ptx", "sm_100", r"is built for sm_100 \(PTX\), the link is for sm_90"),
        ("ltoir", "sm_100", r"the LTO-IR of plugin 'wrong_arch' is for a newer arch than sm_90"),
    ],
)
def test_an_object_for_another_arch_names_both(shared_cache, linker, kind, built, message):
    plugin = Plugin.from_object(nvrtc_object(XOR_REVERSE_SOURCE, kind, arch=built), name="wrong_arch")
    with pytest.raises(CompileError, match=message):
        link("gpuq_batch.cu", plugin)


def test_older_ptx_and_ltoir_link_for_a_newer_arch(shared_cache, linker):
    for kind in ("ptx", "ltoir"):
        assert link("gpuq_batch.cu", Plugin.from_object(nvrtc_object(XOR_REVERSE_SOURCE, kind, "sm_80"), name="old"))


# -- the cache key ---------------------------------------------------------------------------------


def test_the_cache_key_covers_the_object_and_nvjitlink(linker, objects, monkeypatch, cache):
    key = lambda plugin: compiler.cache_key("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin=plugin))
    ltoir = Plugin.from_object(objects["ltoir"], name="xr")
    assert key(ltoir) == key(Plugin.from_object(objects["ltoir"], name="renamed", twin=xor_reverse_twin))
    other = nvrtc_object(XOR_REVERSE_SOURCE.replace("0x5Au", "0xA5u"), "ltoir")
    keys = {key(ltoir), key(Plugin.from_object(other, name="xr")), key("echo")}
    keys |= {key(Plugin.from_object(objects[k], name="xr")) for k in ("ptx", "cubin")}
    assert len(keys) == 5
    monkeypatch.setattr(compiler, "nvjitlink_version", lambda: (99, 0))
    assert key(ltoir) not in keys  # another nvJitLink: another CUBIN
    kernel = lambda plugin: compiler.kernel_ltoir_key("gpuq_batch.cu", CompileOptions(arch="sm_90", plugin=plugin))
    assert kernel(ltoir) == kernel(Plugin.from_object(objects["ptx"], name="xr"))  # one LTO-IR for all objects


def test_another_object_costs_a_link_not_a_compile(linker, objects, cache, counted, linked):
    first = Plugin.from_object(objects["ltoir"], name="xr")
    for plugin in (first, first, Plugin.from_object(objects["cubin"], name="xr"), first):
        link("gpuq_batch.cu", plugin)
    assert len(counted) == 1 and len(linked) == 2  # one NVRTC compile (LTO-IR), one link per object
    assert len(list(cache.glob("*.ltoir"))) == 1 and len(list(cache.glob("*.cubin"))) == 2


# -- no nvJitLink, or too old a one ---------------------------------------------------------------


@pytest.fixture
def no_nvjitlink(monkeypatch):
    """As if nvJitLink could not be found anywhere (the loader's caches cleared before and after)."""
    from cuda import pathfinder
    from cuda.bindings import nvjitlink

    real = pathfinder.load_nvidia_dynamic_lib

    def missing(*args):
        raise RuntimeError("libnvJitLink.so.13 not found (test)")

    def find(name):
        return missing() if name == "nvJitLink" else real(name)

    compiler._nvjitlink.cache_clear()
    compiler.nvjitlink_version.cache_clear()
    monkeypatch.setattr(pathfinder, "load_nvidia_dynamic_lib", find)
    monkeypatch.setattr(nvjitlink, "version", missing)
    monkeypatch.setattr(compiler, "_toolkit_nvjitlink", lambda: [])
    yield
    compiler._nvjitlink.cache_clear()
    compiler.nvjitlink_version.cache_clear()


def test_without_nvjitlink_the_error_says_what_to_install(no_nvjitlink, cache):
    plugin = Plugin.from_object(b"//\n.version 9.0\n.target sm_90\n.address_size 64\n", name="p")
    with pytest.raises(GpuqError, match=r"nvJitLink, which links precompiled plugins, is not usable here") as info:
        link("gpuq_batch.cu", plugin)
    assert "pip install 'gpuq-driver[link]'" in str(info.value) and "CUDA_HOME" in str(info.value)
    assert compiler.compile_cubin("gpuq_batch.cu", CompileOptions(arch="sm_90"))  # source plugins need none


TOOLKIT_ONLY = """\
import cuda.pathfinder as pf
real, calls = pf.load_nvidia_dynamic_lib, []
def first_fails(name):  # as where no wheel, conda or loader path has nvJitLink
    if name == "nvJitLink" and not calls:
        calls.append(name)
        raise RuntimeError("not found")
    return real(name)
pf.load_nvidia_dynamic_lib = first_fails
from gpuq_driver import compiler
print(compiler.nvjitlink_info())
"""


def test_a_toolkits_nvjitlink_under_cuda_home_is_found(linker, tmp_path):
    """The GPU hosts' case: nvJitLink only in a CUDA toolkit (CUDA_HOME or /usr/local/cuda)."""
    from cuda import pathfinder

    lib = Path(pathfinder.load_nvidia_dynamic_lib("nvJitLink").abs_path)
    toolkit = tmp_path / "cuda"
    (toolkit / "lib64").mkdir(parents=True)
    shutil.copy(lib, toolkit / "lib64" / lib.name)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "LD_LIBRARY_PATH")}
    env.update(CUDA_HOME=str(toolkit), PYTHONPATH=str(Path(compiler.__file__).parent.parent))
    r = subprocess.run([sys.executable, "-c", TOOLKIT_ONLY], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{}.{} ({})".format(*linker, toolkit / "lib64" / lib.name)


def test_an_nvjitlink_older_than_nvrtc_is_refused(objects, monkeypatch, cache, counted):
    monkeypatch.setattr(compiler, "nvjitlink_version", lambda: (12, 0))
    with pytest.raises(GpuqError, match=r"nvJitLink 12\.0 .* is older than NVRTC \d+\.\d+ .*cannot link"):
        link("gpuq_batch.cu", Plugin.from_object(objects["ptx"], name="xr"))
    assert not counted


# -- nvcc: the commands docs/api.md gives ----------------------------------------------------------


@pytest.mark.parametrize("what", sorted(NVCC_COMMANDS))
def test_what_nvcc_builds_as_documented_links(shared_cache, linker, nvcc, what):
    path = nvcc.build(what, "sm_90")
    plugin = Plugin.from_object(path, name="xor_reverse")
    assert plugin.kind == NVCC_KIND.get(what, what)
    for source, kernel in KERNEL_OF.items():
        cubin = link(source, plugin)
        assert cubin[:4] == b"\x7fELF" and kernel in cubin


# -- on the GPU: the linked kernels' results, against the twin ---------------------------------------

GPU_BUILDS = ["nvrtc-ltoir", "nvrtc-cubin", "nvcc-ltoir", "nvcc-object", "nvcc-cubin", "nvcc-ptx", "nvcc-fatbin_lto"]


@pytest.fixture
def gpu_plugin(request, gpu, linker):
    """XOR_REVERSE_SOURCE precompiled for the GPU's own arch, as the test's parameter says."""
    maker, what = request.param.split("-", 1)
    if maker == "nvrtc":
        data = nvrtc_object(XOR_REVERSE_SOURCE, what, arch=gpu.arch)
    else:
        data = request.getfixturevalue("nvcc").build(what, gpu.arch).read_bytes()
    return Plugin.from_object(data, name="xor_reverse", twin=xor_reverse_twin)


def first_mismatch(got, payloads, msg_ids):
    for r, p, m in zip(got, payloads, msg_ids):
        if r != xor_reverse_twin(p, m):
            return f"msg_id {m}: {len(p)} bytes in, got {r!r:.80}, want {xor_reverse_twin(p, m)!r:.80}"
    return None


@pytest.mark.parametrize("gpu_plugin", GPU_BUILDS, indirect=True)
def test_a_precompiled_plugin_serves_the_queue_on_the_gpu(gpu_plugin):
    payloads = random_payloads(2000, 512, seed=11)
    got, ids = [], []
    with GpuQueue(QueueConfig(capacity=256, slot_bytes=512, plugin=gpu_plugin)) as q:
        for start in range(0, len(payloads), 200):
            batch = [q.enqueue(p) for p in payloads[start : start + 200]]
            ids += batch
            got += [q.wait_result(m, timeout=10.0) for m in batch]
        stats = q.stats()
    assert ids == list(range(len(payloads))) and first_mismatch(got, payloads, ids) is None
    assert stats.processed == len(payloads)


@pytest.mark.parametrize("gpu_plugin", GPU_BUILDS, indirect=True)
def test_a_precompiled_plugin_in_batch_processor_on_the_gpu(gpu_plugin):
    payloads = random_payloads(3000, 256, seed=12)
    with BatchProcessor(slot_bytes=256, max_batch=1024, plugin=gpu_plugin, backend="cuda") as proc:
        for start in range(0, len(payloads), 1024):
            chunk = payloads[start : start + 1024]
            assert first_mismatch(proc.process(chunk), chunk, range(len(chunk))) is None, start


def serve_params_xor(plugin, backend: str) -> None:
    """PARAMS_XOR through a queue with a 257-byte key; every result against the twin, the 3-byte
    payloads failed with code 7, the queue going on after each."""
    from gpuq_driver import MessageFailed

    key = np.random.default_rng(5).integers(0, 256, 257, dtype=np.uint8)
    payloads = random_payloads(500, 256, seed=13)
    payloads[5:5] = [b"xyz"]
    cfg = QueueConfig(capacity=64, slot_bytes=256, plugin=plugin, params=key, backend=backend)
    with GpuQueue(cfg) as q:
        for p in payloads:
            m = q.enqueue(p)
            if len(p) == 3:
                with pytest.raises(MessageFailed) as info:
                    q.wait_result(m, timeout=10.0)
                assert info.value.code == 7 and info.value.msg_id == m
            else:
                assert q.wait_result(m, timeout=10.0) == params_xor_twin(p, m, key.tobytes()), m


def test_a_precompiled_plugin_with_params_runs_its_twin_on_the_simulator():
    serve_params_xor(
        Plugin.from_object(nvrtc_object(PARAMS_XOR_SOURCE, "ptx"), name="params_xor", twin=params_xor_twin), "sim"
    )


@pytest.mark.parametrize("kind", ["ltoir", "cubin"])
def test_a_precompiled_plugin_reads_params_and_fails_a_message_on_the_gpu(gpu, linker, kind):
    data = nvrtc_object(PARAMS_XOR_SOURCE, kind, arch=gpu.arch)
    serve_params_xor(Plugin.from_object(data, name="params_xor", twin=params_xor_twin), "cuda")
