"""NVRTC: compile ``device_src/`` to a CUBIN for one exact ``sm_XY``, with an on-disk cache.

Headers: ``device_src/`` itself, then CCCL (libcu++ ``<cuda/atomic>``, ``<cuda/std/...>``) found by
``cuda.pathfinder`` (pip wheel ``nvidia-cuda-cccl``, or a CUDA toolkit under CUDA_HOME/CUDA_PATH or
/usr/local/cuda), so a machine with nothing but pip packages compiles.

The plugin (plugins.py) reaches NVRTC as an in-memory header, ``gpuq_plugin.cuh``, which the
kernels include through ``GPUQ_PLUGIN_FILE``; a plugin's own file can be anywhere.

A *precompiled* plugin (``Plugin.from_object``: LTO-IR, PTX, CUBIN, fatbin, an ``nvcc -dc``
object or library) is linked instead: NVRTC compiles the kernel as relocatable LTO-IR
(``-rdc=true -dlto``) with ``gpuq_plugin_extern.cuh`` (``gpuq_process`` declared extern "C") in
place of the plugin, and nvJitLink links that with the plugin's object (``-arch=sm_XY -lto``, so
an LTO-IR plugin is inlined as a source one is) into the CUBIN.  nvJitLink is found by
``cuda.pathfinder`` (pip wheel ``nvidia-nvjitlink``, the ``link`` extra) or in the toolkit under
CUDA_HOME/CUDA_PATH or /usr/local/cuda; it must be at least as new as NVRTC (it reads NVRTC's
LTO-IR) and as the toolkit that built the plugin.

Cache (modelled on CuPy's kernel cache): one file per CUBIN under
``<user cache dir>/gpuq_driver/cubin-v1/``, named by the SHA-256 of every ``device_src`` file's
path and bytes, the plugin's name and source (a precompiled plugin: its kind and bytes, and the
nvJitLink version), the CCCL version header, the NVRTC version, the target arch and the options.
For a precompiled plugin the kernel's LTO-IR is cached too (``<key>.ltoir``, keyed without the
plugin), so that another plugin object costs only the link.
Entries are written to a temporary file and renamed (atomic on POSIX), carry a checksum, and a
corrupt or truncated entry is ignored and rebuilt.  ``GPUQ_CACHE_DIR=/path`` relocates the cache;
``GPUQ_CACHE_DIR=off`` (or empty, ``0``, ``none``, ``false``) disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .errors import CompileError, GpuqError, check
from .plugins import EXTERN_HEADER, HEADER_NAME, KIND_NAMES, Plugin, available, resolve

_HERE = Path(__file__).resolve().parent
DEVICE_SRC = _HERE / "device_src" if (_HERE / "device_src").is_dir() else _HERE.parent / "device_src"
"""The kernel sources: ``gpuq_driver/device_src`` inside a wheel, ``<repo>/device_src`` in a checkout."""

CACHE_FORMAT = "cubin-v1"
_MAGIC = b"GPUQCUBIN1\n"


@dataclass(frozen=True)
class CompileOptions:
    """What to build.

    arch:      NVRTC target, ``"sm_90"`` for an H100/H200; the CUBIN runs only on that arch.
    std:       C++ dialect, default ``"c++17"``.
    plugin:    the processing function: a name (a built-in in ``device_src/plugins``, or an entry
               point) or a ``Plugin`` (default ``"echo"``), of source (compiled in by NVRTC) or
               precompiled (``Plugin.from_object``: linked in by nvJitLink); see gpuq_driver/plugins.py.
    defines:   extra ``NAME`` or ``NAME=VALUE`` macros.
    extra:     extra NVRTC options, e.g. ``("-lineinfo",)``.
    """

    arch: str = "sm_90"
    std: str = "c++17"
    plugin: str | Plugin = "echo"
    defines: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())

    def nvrtc_options(self, include_dirs: tuple[str, ...]) -> tuple[str, ...]:
        """NVRTC's options; for a precompiled plugin the kernel is relocatable LTO-IR (``-rdc=true
        -dlto``) that includes ``gpuq_plugin_extern.cuh`` in place of the plugin."""
        opts = [
            f"--gpu-architecture={self.arch}",
            f"--std={self.std}",
            "--device-as-default-execution-space",
        ]
        if resolve(self.plugin).precompiled:
            opts += [f'-DGPUQ_PLUGIN_FILE="{EXTERN_HEADER}"', "-rdc=true", "-dlto"]
        else:
            opts += [f'-DGPUQ_PLUGIN_FILE="{HEADER_NAME}"']
        opts += [f"-D{d}" for d in self.defines]
        opts += [f"-I{d}" for d in include_dirs]
        opts += list(self.extra)
        return tuple(opts)

    def link_options(self) -> tuple[str, ...]:
        """nvJitLink's options for a precompiled plugin: the arch, and link-time optimisation (the
        kernel is LTO-IR)."""
        return (f"-arch={self.arch}", "-lto")


def source_files() -> list[Path]:
    """Every file under ``device_src/`` (sources, headers, plugins), sorted."""
    return sorted(p for p in DEVICE_SRC.rglob("*") if p.is_file() and p.suffix in {".cu", ".cuh", ".h"})


def kernel_sources() -> list[Path]:
    """The compilable translation units (``device_src/*.cu``)."""
    return sorted(DEVICE_SRC.glob("*.cu"))


def plugins() -> list[str]:
    """Names of the plugins found by name: ``device_src/plugins/`` and entry points (plugins.available)."""
    return available()


def _has_cccl(folder: Path) -> bool:
    return (folder / "cuda" / "atomic").is_file()


@lru_cache(maxsize=1)
def include_dirs() -> tuple[str, ...]:
    """``device_src`` and the CCCL header directory.

    Looks with ``cuda.pathfinder.find_nvidia_header_directory("cccl")`` (pip wheels, conda,
    CUDA_HOME), then in ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda`` (``include/cccl`` or
    ``include``).  Raises GpuqError naming what to install when none has ``<cuda/atomic>``.
    """
    candidates: list[Path] = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cccl")
        if found:
            candidates.append(Path(found))
    except Exception:  # an older cuda-pathfinder, or nothing found: try the toolkit folders
        pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates += [Path(root) / "include" / "cccl", Path(root) / "include"]
    for folder in candidates:
        if _has_cccl(folder):
            return (str(DEVICE_SRC), str(folder))
    raise GpuqError(
        "CCCL headers (<cuda/atomic>) not found: pip install nvidia-cuda-cccl, or set CUDA_HOME to a CUDA toolkit"
    )


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    from cuda.bindings import nvrtc

    major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def cache_dir() -> Path | None:
    """The versioned cache folder, or None when ``GPUQ_CACHE_DIR`` disables the cache."""
    env = os.environ.get("GPUQ_CACHE_DIR")
    if env is not None and env.strip().lower() in {"", "0", "off", "none", "false"}:
        return None
    if env:
        base = Path(env)
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("gpuq_driver"))
    return base / CACHE_FORMAT


def _kernel_hash(source: str, options: CompileOptions):
    """SHA-256 so far over what NVRTC compiles: all of ``device_src`` (paths + bytes), the CCCL
    version, NVRTC version, source, options (not the plugin)."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(str(path.relative_to(DEVICE_SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    cccl_version = Path(include_dirs()[1]) / "cuda" / "std" / "__cccl" / "version.h"
    h.update(cccl_version.read_bytes() if cccl_version.exists() else include_dirs()[1].encode())
    h.update(repr((source, nvrtc_version(), options.nvrtc_options(("<inc>",)))).encode())
    return h


def cache_entries(folder: Path) -> list[Path]:
    """The entries in a cache folder: CUBINs, and kernels' LTO-IR for precompiled plugins."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".cubin", ".ltoir") and not p.name.startswith("."))


def cache_key(source: str, options: CompileOptions) -> str:
    """SHA-256 over all of ``device_src`` (paths + bytes), the plugin's name and source (as compiled)
    or, for a precompiled plugin, its kind and bytes and the nvJitLink version and options; the
    CCCL version, NVRTC version, arch, options.  Raises ConfigError for an unknown plugin,
    GpuqError when a precompiled plugin needs nvJitLink and there is none."""
    plugin = resolve(options.plugin)
    h = _kernel_hash(source, options)
    if plugin.precompiled:
        h.update(b"\0object\0" + plugin.kind.encode() + b"\0" + plugin.binary)
        h.update(repr(("nvJitLink", nvjitlink_version(), options.link_options())).encode())
    else:
        h.update(b"\0plugin\0" + plugin.name.encode() + b"\0" + plugin.header())
    return h.hexdigest()


def kernel_ltoir_key(source: str, options: CompileOptions) -> str:
    """The cache key of the kernel's LTO-IR for a precompiled plugin: what NVRTC compiles, without
    the plugin (every precompiled plugin links with the same LTO-IR)."""
    h = _kernel_hash(source, options)
    h.update(b"\0kernel LTO-IR, plugin extern\0")
    return h.hexdigest()


def _read_cache(path: Path) -> bytes | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 32:
        return None
    digest, cubin = blob[len(_MAGIC) : len(_MAGIC) + 32], blob[len(_MAGIC) + 32 :]
    if not cubin or hashlib.sha256(cubin).digest() != digest:
        return None  # corrupt or truncated: rebuild
    return cubin


def _write_cache(path: Path, cubin: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(cubin).digest() + cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache folder only costs a recompile next time


def _nvrtc_compile(source: str, options: CompileOptions) -> bytes:
    """NVRTC: the CUBIN of ``source`` with a source plugin in it, or, for a precompiled plugin, the
    kernel's relocatable LTO-IR (the plugin declared extern)."""
    from cuda.bindings import nvrtc

    src_path = DEVICE_SRC / source
    if not src_path.is_file():
        raise GpuqError(f"no kernel source {src_path}")
    plugin = resolve(options.plugin)
    opts = options.nvrtc_options(include_dirs())
    headers, names = ([], []) if plugin.precompiled else ([plugin.header()], [HEADER_NAME.encode()])
    prog = check(
        nvrtc.nvrtcCreateProgram(src_path.read_bytes(), source.encode(), len(headers), headers, names),
        "nvrtcCreateProgram",
    )
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if int(result[0]) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CompileError(source, opts, log.rstrip(b"\0 ").decode(errors="replace"), plugin)
        if plugin.precompiled:
            size = int(check(nvrtc.nvrtcGetLTOIRSize(prog), "nvrtcGetLTOIRSize"))
            if size == 0:
                raise CompileError(source, opts, "NVRTC produced empty LTO-IR", plugin)
            ltoir = b" " * size
            check(nvrtc.nvrtcGetLTOIR(prog, ltoir), "nvrtcGetLTOIR")
            return ltoir
        size = int(check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize"))
        if size == 0:
            raise CompileError(source, opts, "NVRTC produced an empty CUBIN (is the arch a real sm_XY?)")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# -- nvJitLink: precompiled plugins ---------------------------------------------------------------

NVJITLINK_INSTALL = (
    "pip install 'gpuq-driver[link]' (the nvidia-nvjitlink wheel; keep it at least as new as nvidia-cuda-nvrtc), "
    "or set CUDA_HOME to a CUDA toolkit whose lib64 has libnvJitLink.so"
)
"""What to install for precompiled plugins, as errors say it."""


def _toolkit_nvjitlink() -> list[Path]:
    """libnvJitLink.so* in the toolkits under CUDA_HOME, CUDA_PATH and /usr/local/cuda, newest name first."""
    found: list[Path] = []
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not root:
            continue
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            found += sorted((Path(root) / sub).glob("libnvJitLink.so*"), reverse=True)
    return found


@lru_cache(maxsize=1)
def _nvjitlink():
    """``cuda.bindings.nvjitlink``, its library loaded: by ``cuda.pathfinder`` (wheels, conda, the
    system loader, CUDA_HOME/CUDA_PATH), else from the toolkits that :func:`_toolkit_nvjitlink` lists
    (loaded here first; pathfinder then finds it already loaded).  Raises GpuqError naming what to
    install when there is none."""
    errors = []
    try:
        from cuda import pathfinder

        pathfinder.load_nvidia_dynamic_lib("nvJitLink")
    except Exception as exc:  # not found, or an older cuda-pathfinder: try the toolkit folders
        errors.append(f"{type(exc).__name__}: {exc}")
        for path in _toolkit_nvjitlink():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                break
            except OSError as load_exc:
                errors.append(f"{path}: {load_exc}")
    try:
        from cuda.bindings import nvjitlink

        nvjitlink.version()
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        raise GpuqError(
            f"nvJitLink, which links precompiled plugins, is not usable here ({'; '.join(errors)}): {NVJITLINK_INSTALL}"
        ) from None
    return nvjitlink


@lru_cache(maxsize=1)
def nvjitlink_version() -> tuple[int, int]:
    """(major, minor) of the nvJitLink library in use.  Raises GpuqError (what to install) without one."""
    major, minor = _nvjitlink().version()
    return int(major), int(minor)


def _library_path(name: str) -> str:
    """Where ``cuda.pathfinder`` has the library ``name`` loaded from, or ``"?"``."""
    try:
        from cuda import pathfinder

        return str(pathfinder.load_nvidia_dynamic_lib(name).abs_path)
    except Exception:
        return "?"


def nvjitlink_info() -> str:
    """``"13.0 (/path/libnvJitLink.so.13)"``, for messages and ``gpuq info``.  GpuqError without one."""
    return "{}.{} ({})".format(*nvjitlink_version(), _library_path("nvJitLink"))


def _check_linker() -> None:
    """nvJitLink must read NVRTC's LTO-IR: at least NVRTC's version.  GpuqError otherwise."""
    if nvjitlink_version() < nvrtc_version():
        raise GpuqError(
            f"nvJitLink {nvjitlink_info()} is older than NVRTC {'{}.{}'.format(*nvrtc_version())} "
            f"({_library_path('nvrtc')}), so it cannot link the kernel NVRTC compiles for a precompiled plugin: "
            f"{NVJITLINK_INSTALL}"
        )


def _kernel_ltoir(source: str, options: CompileOptions) -> bytes:
    """The kernel's relocatable LTO-IR for a precompiled plugin (gpuq_process extern), from the
    cache when present."""
    folder = cache_dir()
    path = folder / f"{kernel_ltoir_key(source, options)}.ltoir" if folder is not None else None
    if path is not None:
        ltoir = _read_cache(path)
        if ltoir is not None:
            return ltoir
    ltoir = _nvrtc_compile(source, options)
    if path is not None:
        _write_cache(path, ltoir)
    return ltoir


def _arch_number(arch: str) -> int | None:
    digits = "".join(c for c in arch.split("_", 1)[-1] if c.isdigit())
    return int(digits) if digits else None


def _explain_link_error(status: str, log: str, plugin: Plugin, arch: str) -> str:
    """One line that says what went wrong, where nvJitLink's own words leave it to guess."""
    built = plugin.arches()
    built_for = ", ".join(built) if built else "an arch its headers do not tell"
    target = _arch_number(arch)
    usable = []
    for entry in built:
        number = _arch_number(entry.split(" ", 1)[0])
        if number is None or target is None:
            continue
        usable.append(number == target if entry.endswith("(CUBIN)") else number <= target)
    if re.search(r"(Undefined reference to|Unresolved extern function) 'gpuq_process'", log):
        return (
            f"plugin {plugin.name!r} does not define gpuq_process with C linkage in relocatable code: define it "
            'as extern "C" __device__ uint32_t gpuq_process(const uint8_t* in, uint32_t len, uint8_t* out, '
            "uint32_t out_cap, uint64_t msg_id, uint32_t lane) (include gpuq_plugin_extern.cuh), and build it "
            "with -rdc=true (CUBIN, PTX, fatbin, library) or -dlto (LTO-IR, -dc object)"
        )
    if usable and not any(usable):  # none of what its headers name can link for this arch
        return (
            f"plugin {plugin.name!r} is built for {built_for}, the link is for {arch}: rebuild it with -arch={arch} "
            "(a CUBIN must match the GPU's arch exactly; PTX and LTO-IR may be for an older one)"
        )
    if "newer than target arch" in log:
        what = KIND_NAMES[plugin.kind]
        return f"the {what} of plugin {plugin.name!r} is for a newer arch than {arch}: rebuild it with -arch={arch}"
    if "OUTDATED_LIBRARY" in status or "newer version of nvJitLink" in log:
        return (
            f"plugin {plugin.name!r} was built by a newer CUDA toolkit than this nvJitLink, {nvjitlink_info()}: "
            f"rebuild it with that toolkit's version or older, or {NVJITLINK_INSTALL}"
        )
    if "INCORRECT_INPUT_TYPE" in status or "UNRECOGNIZED_INPUT" in status:
        return f"plugin {plugin.name!r}: the bytes are not {KIND_NAMES[plugin.kind]} ({plugin.kind!r})"
    return f"plugin {plugin.name!r} ({KIND_NAMES[plugin.kind]}, built for {built_for}) did not link for {arch}"


def _nvjitlink_link(source: str, options: CompileOptions, ltoir: bytes) -> bytes:
    """nvJitLink: the kernel's LTO-IR + the precompiled plugin -> the CUBIN."""
    nvjitlink = _nvjitlink()
    plugin = resolve(options.plugin)
    opts = options.link_options()
    handle = nvjitlink.create(len(opts), list(opts))
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, ltoir, len(ltoir), f"{source} (LTO-IR)")
            kind = getattr(nvjitlink.InputType, plugin.kind.upper())
            nvjitlink.add_data(handle, kind, plugin.binary, len(plugin.binary), plugin.origin)
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            size = nvjitlink.get_error_log_size(handle)
            buf = bytearray(size)
            if size:
                nvjitlink.get_error_log(handle, buf)
            log = bytes(buf).rstrip(b"\0").decode(errors="replace").strip()
            why = _explain_link_error(str(exc), log, plugin, options.arch)
            raise CompileError(source, opts, f"{why}\nnvJitLink: {exc}\n{log}", plugin, tool="nvJitLink") from None
        size = int(nvjitlink.get_linked_cubin_size(handle))
        if size == 0:
            raise CompileError(
                source, opts, "nvJitLink produced an empty CUBIN (is the arch a real sm_XY?)", plugin, tool="nvJitLink"
            )
        cubin = bytearray(size)
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin)
    finally:
        nvjitlink.destroy(handle)


def compile_cubin(source: str = "gpuq_queue.cu", options: CompileOptions = CompileOptions()) -> bytes:
    """The CUBIN of ``device_src/<source>`` for ``options.arch``, from the cache when present.

    A source plugin is compiled in by NVRTC; a precompiled one is linked in by nvJitLink with the
    kernel's LTO-IR (the module docstring).

    Raises CompileError (with NVRTC's full log, whose messages name the plugin's own file and
    lines, the source name, the plugin and the options) when NVRTC rejects the source or yields an
    empty CUBIN, or (``tool="nvJitLink"``, with nvJitLink's log after a line that says what was
    wrong) when a precompiled plugin does not link: no extern "C" gpuq_process, built for another
    arch, by a newer toolkit than nvJitLink, not the kind it says; ConfigError (a GpuqError) for an
    unknown plugin; GpuqError when the source or the CCCL headers are missing, or a precompiled
    plugin finds no nvJitLink, or one older than NVRTC (the message says what to install);
    CudaError when NVRTC itself cannot be loaded.
    """
    options = replace(options, plugin=resolve(options.plugin))
    folder = cache_dir()
    path = folder / f"{cache_key(source, options)}.cubin" if folder is not None else None
    if path is not None:
        cubin = _read_cache(path)
        if cubin is not None:
            return cubin
    if options.plugin.precompiled:
        _check_linker()
        cubin = _nvjitlink_link(source, options, _kernel_ltoir(source, options))
    else:
        cubin = _nvrtc_compile(source, options)
    if path is not None:
        _write_cache(path, cubin)
    return cubin
