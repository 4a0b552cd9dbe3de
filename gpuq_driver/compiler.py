"""NVRTC: compile ``device_src/`` to a CUBIN for one exact ``sm_XY``, with an on-disk cache.

Headers: ``device_src/`` itself, then CCCL (libcu++ ``<cuda/atomic>``, ``<cuda/std/...>``) found by
``cuda.pathfinder`` (pip wheel ``nvidia-cuda-cccl``, or a CUDA toolkit under CUDA_HOME/CUDA_PATH or
/usr/local/cuda), so a machine with nothing but pip packages compiles.

The plugin (plugins.py) reaches NVRTC as an in-memory header, ``gpuq_plugin.cuh``, which the
kernels include through ``GPUQ_PLUGIN_FILE``; a plugin's own file can be anywhere.

Cache (modelled on CuPy's kernel cache): one file per CUBIN under
``<user cache dir>/gpuq_driver/cubin-v1/``, named by the SHA-256 of every ``device_src`` file's
path and bytes, the plugin's name and source, the CCCL version header, the NVRTC version, the
target arch and the options.
Entries are written to a temporary file and renamed (atomic on POSIX), carry a checksum, and a
corrupt or truncated entry is ignored and rebuilt.  ``GPUQ_CACHE_DIR=/path`` relocates the cache;
``GPUQ_CACHE_DIR=off`` (or empty, ``0``, ``none``, ``false``) disables it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .errors import CompileError, GpuqError, check
from .plugins import HEADER_NAME, Plugin, available, resolve

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
               point) or a ``Plugin`` (default ``"echo"``); see gpuq_driver/plugins.py.
    defines:   extra ``NAME`` or ``NAME=VALUE`` macros.
    extra:     extra NVRTC options, e.g. ``("-lineinfo",)``.
    """

    arch: str = "sm_90"
    std: str = "c++17"
    plugin: str | Plugin = "echo"
    defines: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())

    def nvrtc_options(self, include_dirs: tuple[str, ...]) -> tuple[str, ...]:
        opts = [
            f"--gpu-architecture={self.arch}",
            f"--std={self.std}",
            "--device-as-default-execution-space",
            f'-DGPUQ_PLUGIN_FILE="{HEADER_NAME}"',
        ]
        opts += [f"-D{d}" for d in self.defines]
        opts += [f"-I{d}" for d in include_dirs]
        opts += list(self.extra)
        return tuple(opts)


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


def cache_key(source: str, options: CompileOptions) -> str:
    """SHA-256 over all of ``device_src`` (paths + bytes), the plugin's name and source (as compiled),
    the CCCL version, NVRTC version, arch, options.  Raises ConfigError for an unknown plugin."""
    plugin = resolve(options.plugin)
    h = hashlib.sha256()
    for path in source_files():
        h.update(str(path.relative_to(DEVICE_SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    cccl_version = Path(include_dirs()[1]) / "cuda" / "std" / "__cccl" / "version.h"
    h.update(cccl_version.read_bytes() if cccl_version.exists() else include_dirs()[1].encode())
    h.update(repr((source, nvrtc_version(), options.nvrtc_options(("<inc>",)))).encode())
    h.update(b"\0plugin\0" + plugin.name.encode() + b"\0" + plugin.header())
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(cubin).digest() + cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache folder only costs a recompile next time


def _nvrtc_compile(source: str, options: CompileOptions) -> bytes:
    from cuda.bindings import nvrtc

    src_path = DEVICE_SRC / source
    if not src_path.is_file():
        raise GpuqError(f"no kernel source {src_path}")
    plugin = resolve(options.plugin)
    opts = options.nvrtc_options(include_dirs())
    prog = check(
        nvrtc.nvrtcCreateProgram(src_path.read_bytes(), source.encode(), 1, [plugin.header()], [HEADER_NAME.encode()]),
        "nvrtcCreateProgram",
    )
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if int(result[0]) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CompileError(source, opts, log.rstrip(b"\0 ").decode(errors="replace"), plugin)
        size = int(check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize"))
        if size == 0:
            raise CompileError(source, opts, "NVRTC produced an empty CUBIN (is the arch a real sm_XY?)")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(source: str = "gpuq_queue.cu", options: CompileOptions = CompileOptions()) -> bytes:
    """The CUBIN of ``device_src/<source>`` for ``options.arch``, from the cache when present.

    Raises CompileError (with NVRTC's full log, whose messages name the plugin's own file and
    lines, the source name, the plugin and the options) when NVRTC rejects the source or yields an
    empty CUBIN; ConfigError (a GpuqError) for an unknown plugin; GpuqError when the source or the
    CCCL headers are missing; CudaError when NVRTC itself cannot be loaded.
    """
    options = replace(options, plugin=resolve(options.plugin))
    folder = cache_dir()
    path = folder / f"{cache_key(source, options)}.cubin" if folder is not None else None
    if path is not None:
        cubin = _read_cache(path)
        if cubin is not None:
            return cubin
    cubin = _nvrtc_compile(source, options)
    if path is not None:
        _write_cache(path, cubin)
    return cubin
