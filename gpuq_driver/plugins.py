"""Plugins: the processing function that the queue's kernel (and BatchProcessor) runs on each message.

A plugin is CUDA C++ source that defines the warp-cooperative device function ::

    __device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                     uint8_t* __restrict__ out, uint32_t out_cap,
                                                     uint64_t msg_id, uint32_t lane);

called by all 32 lanes of one warp per message (``lane`` 0..31): ``in`` is the payload, ``len``
bytes (16-byte aligned, readable in whole 16-byte words); ``out`` the result buffer, ``out_cap``
(= ``slot_bytes``) bytes, 16-byte aligned; it returns the result length, the same on every lane.
It must write at most ``out_cap`` bytes; a returned length above ``out_cap`` (and below
``FAIL_BIT``) is a BAD_RESULT protocol error for that message (its result is empty,
``ProtocolError`` when taken).  It may instead fail the message: ``return GPUQ_FAIL(code);``
(code 0..65535; any value >= ``FAIL_BIT`` fails with code ``value & 0xFFFF``): the result is empty
and taking it raises ``MessageFailed`` (``.msg_id``, ``.code``), while the queue goes on.  It may
read the per-queue parameters (``QueueConfig(params=...)``, params.py) through ``gpuq_params()``
and ``gpuq_params_bytes()``.  Those names come from ``device_src/gpuq_plugin_api.cuh``, included
before every plugin; the contract is also in ``device_src/plugins/echo.cuh``.

A :class:`Plugin` carries a name, that source, and optionally a Python *twin*
``f(payload: memoryview, msg_id: int) -> bytes-like`` computing the same result, which the CPU
simulator (``backend="sim"``) and BatchProcessor's NumPy path run instead of the device code.  A
twin that has a parameter named ``params`` is also given the per-queue parameters (a read-only
memoryview of bytes, empty when none), one that has a parameter named ``out_cap`` the result
capacity (``slot_bytes``), as keywords; others are called with the two arguments only.  A twin
fails a message by raising :class:`Fail` ``(code)``; any other exception it raises is a fault (the
simulator stops for good, as a faulting device plugin stops the kernel).

Where plugins come from (:func:`resolve` is the one lookup, used by QueueConfig, the kernel, the
simulator and BatchProcessor): a :class:`Plugin` object (:meth:`Plugin.from_source`,
:meth:`Plugin.from_file`), or a name: the built-ins ``device_src/plugins/<name>.cuh`` (``echo``,
``crc32c``, ``score``; their twins are below), then entry points of the group ``gpuq_driver.plugins``, so that
a package can ship plugins::

    [project.entry-points."gpuq_driver.plugins"]
    rot13 = "my_package.gpuq:ROT13"   # a Plugin, or a function of no arguments returning one

Entry points are imported only when their name is looked up; a built-in's name wins over an entry
point's.

A plugin may also come *precompiled* (:meth:`Plugin.from_object`): LTO-IR, PTX, a relocatable
CUBIN, a fatbin, an ``nvcc -dc`` object or a static library that defines ``gpuq_process`` with C
linkage (``device_src/gpuq_plugin_extern.cuh``).  The compiler then builds the kernel as LTO-IR
and links the two with nvJitLink (compiler.py); the kind is told by the bytes (:func:`detect_kind`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import operator
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

ENTRY_POINT_GROUP = "gpuq_driver.plugins"
"""The entry-point group in which installed packages name their plugins."""

HEADER_NAME = "gpuq_plugin.cuh"
"""The in-memory header that carries the plugin's source into NVRTC (``GPUQ_PLUGIN_FILE``)."""

EXTERN_HEADER = "gpuq_plugin_extern.cuh"
"""The header in ``device_src`` that declares ``gpuq_process`` extern "C": what the kernels include
in place of a precompiled plugin's source, and what that plugin's own .cu includes."""

OBJECT_KINDS = ("ltoir", "ptx", "cubin", "fatbin", "object", "library")
"""What a precompiled plugin can be (:meth:`Plugin.from_object`), as nvJitLink takes it: LTO-IR
(``nvrtc -dlto`` output, or an nvcc ``.ltoir``), PTX text, a relocatable CUBIN (``-rdc=true``), a
fatbin (of any of those), a host object from ``nvcc -dc`` (device code embedded), a static
library (``nvcc -lib``)."""

KIND_NAMES = {
    "source": "CUDA source",
    "ltoir": "LTO-IR",
    "ptx": "PTX",
    "cubin": "CUBIN",
    "fatbin": "fatbin",
    "object": "host object with device code",
    "library": "static library",
}

Twin = Callable[..., Any]
"""``f(payload: memoryview, msg_id: int[, params=memoryview][, out_cap=int]) -> bytes-like``."""

FAIL_BIT = 0x80000000
"""``GPUQ_FAIL_BIT`` of gpuq_plugin_api.cuh: a plugin's return value at or above it fails the message."""
MAX_FAIL_CODE = 0xFFFF
"""The largest failure code (``GPUQ_FAIL(code)`` keeps ``code & 0xFFFF``)."""

_NO_PARAMS = memoryview(b"")
TWIN_KEYWORDS = ("params", "out_cap")
"""The optional keyword arguments a twin receives when it names them (or takes ``**kwargs``)."""


class Fail(Exception):
    """Raised by a twin to fail one message with ``code`` (0 .. 65535), as the device code does with
    ``return GPUQ_FAIL(code);``: the message gets an empty result and taking it raises
    ``gpuq_driver.MessageFailed`` with that code; the queue goes on.  Raises ValueError for a code
    that is not an int in 0 .. 65535 (the device would silently keep ``code & 0xFFFF``)."""

    def __init__(self, code: int):
        try:
            if isinstance(code, bool):
                raise TypeError
            code = operator.index(code)
        except TypeError:
            raise ValueError(f"Fail(code={code!r}): code must be an int, 0 .. {MAX_FAIL_CODE}") from None
        if not 0 <= code <= MAX_FAIL_CODE:
            raise ValueError(f"Fail(code={code}): code must be 0 .. {MAX_FAIL_CODE}")
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"the plugin failed the message with code {self.code}"


def _name_from_file(path: Path, stem: str) -> str:
    """The plugin name a file gives (``stem``); ConfigError saying to pass ``name=`` when it is
    not an identifier (``my-plugin.cuh``)."""
    if not stem.isidentifier():
        raise ConfigError(
            f"plugin file {str(path)!r}: its name would be {stem!r} (from the file name), which is not an "
            "identifier: pass name=, e.g. name='my_plugin'"
        )
    return stem


def _twin_keywords(twin) -> tuple[str, ...]:
    """Which of TWIN_KEYWORDS ``twin`` takes by name (all of them if it takes ``**kwargs``); ()
    when its signature cannot be read (a builtin): it is then called with two arguments."""
    try:
        parameters = inspect.signature(twin).parameters.values()
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return TWIN_KEYWORDS
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return tuple(k for k in TWIN_KEYWORDS if k in named)


@dataclass(frozen=True, repr=False)
class Plugin:
    """A processing function: CUDA source defining ``gpuq_process`` (see the module docstring), or
    a precompiled object that defines it (:meth:`from_object`).

    name:    an identifier, e.g. ``"crc32c"``: what errors and ``repr`` show.
    source:  the CUDA C++ text (compiled in, so it may ``#include`` CCCL headers such as
             ``<cuda/std/cstdint>``; ``uint8_t``/``uint32_t``/``uint64_t``/``uint4`` are defined);
             ``""`` for a precompiled plugin.
    twin:    optional ``f(payload: memoryview, msg_id: int) -> bytes-like``, the same function in
             Python for the simulator and BatchProcessor's NumPy path; None = GPU only.  If it
             has a parameter named ``params`` (or ``out_cap``) it also gets the per-queue params
             (or ``slot_bytes``) as that keyword; it fails a message by raising :class:`Fail`.
    origin:  the file name compiler and linker messages give (for source, with line numbers of
             ``source`` itself): the path for :meth:`from_file` and :meth:`from_object`;
             ``"<name>.cuh"`` (source) or ``"<name>.<kind>"`` (an object) by default.
    binary:  a precompiled plugin's bytes (``b""`` for source).
    kind:    ``"source"``, or for a precompiled plugin one of :data:`OBJECT_KINDS`.

    Raises ConfigError for a name that is not an identifier, a source that is not a str or does
    not mention ``gpuq_process``, a twin that is not callable, an unknown kind, a precompiled
    plugin with source or without bytes, or bytes that are not what ``kind`` says (see
    :meth:`from_object`).
    """

    name: str
    source: str = ""
    twin: Twin | None = None
    origin: str = ""
    binary: bytes = b""
    kind: str = "source"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(f"Plugin name={self.name!r} must be an identifier such as 'my_plugin'")
        if self.kind == "source":
            if not isinstance(self.source, str):
                raise ConfigError(f"plugin {self.name!r}: source must be a str, not {type(self.source).__name__}")
            if "gpuq_process" not in self.source:
                raise ConfigError(
                    f"plugin {self.name!r}: the source does not define "
                    "gpuq_process(in, len, out, out_cap, msg_id, lane)"
                )
            if self.binary:
                raise ConfigError(f"plugin {self.name!r}: binary is only for a precompiled kind {OBJECT_KINDS}")
        elif self.kind in OBJECT_KINDS:
            if self.source:
                raise ConfigError(f"plugin {self.name!r}: a precompiled plugin ({self.kind}) has no source")
            if not isinstance(self.binary, bytes) or not self.binary:
                raise ConfigError(f"plugin {self.name!r}: a precompiled plugin's binary must be non-empty bytes")
            _check_object(self.name, self.kind, self.binary)
        else:
            raise ConfigError(f"plugin {self.name!r}: kind={self.kind!r} must be 'source' or one of {OBJECT_KINDS}")
        if self.twin is not None and not callable(self.twin):
            raise ConfigError(f"plugin {self.name!r}: twin must be callable(payload, msg_id) or None")
        if not self.origin:
            object.__setattr__(
                self, "origin", f"{self.name}.cuh" if self.kind == "source" else f"{self.name}.{self.kind}"
            )
        # not a field: derived from the twin once (equality and hashing ignore it)
        object.__setattr__(self, "_twin_keywords", _twin_keywords(self.twin) if self.twin is not None else ())

    @property
    def precompiled(self) -> bool:
        """True for a plugin given as an object (linked with nvJitLink), False for source (NVRTC)."""
        return self.kind != "source"

    @classmethod
    def from_source(cls, name: str, source: str, twin: Twin | None = None) -> Plugin:
        """A plugin from CUDA source text; NVRTC's messages name it ``<name>.cuh``."""
        return cls(name, source, twin)

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None, twin: Twin | None = None) -> Plugin:
        """A plugin from a ``.cuh`` file anywhere (read now, UTF-8); ``name`` defaults to the file's
        stem.  NVRTC's messages name the file by this path.  Raises ConfigError if it cannot be read."""
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"plugin file {str(path)!r} cannot be read: {exc}") from exc
        return cls(_name_from_file(path, path.stem) if name is None else name, source, twin, str(path))

    @classmethod
    def from_object(
        cls,
        obj: str | os.PathLike | bytes | bytearray | memoryview,
        name: str | None = None,
        twin: Twin | None = None,
        kind: str | None = None,
    ) -> Plugin:
        """A precompiled plugin: a file (a path, read now) or its bytes, linked into the kernels
        with nvJitLink.

        It must define ``extern "C" __device__ uint32_t gpuq_process(...)`` (the declaration is in
        ``device_src/gpuq_plugin_extern.cuh``), built for the GPU's arch or an older one (PTX,
        LTO-IR) by a toolkit no newer than the nvJitLink in use.  ``kind`` (one of
        :data:`OBJECT_KINDS`) is told by the bytes when None (:func:`detect_kind`: ELF machine
        190 = CUBIN, another ELF = host object, the fatbin, LTO-IR and ``!<arch>`` magics, PTX's
        ``.version``/``.target``); ``name`` defaults to the file's stem and is needed for bytes.

        Raises ConfigError when the file cannot be read, the bytes are empty or of no kind known
        (or not of the ``kind`` given), a CUBIN is not relocatable (built without ``-rdc=true``:
        its device functions are gone), or ``name`` is missing or not an identifier.  What only
        the link can tell (an undefined ``gpuq_process``, a wrong arch) is a CompileError when
        the kernel is built.
        """
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"plugin object {str(path)!r} cannot be read: {exc}") from exc
            name = _name_from_file(path, path.name.split(".")[0]) if name is None else name
            origin = str(path)
        else:
            try:
                data = bytes(memoryview(obj))
            except TypeError:
                raise ConfigError(
                    f"Plugin.from_object: obj must be a path or bytes-like, not {type(obj).__name__}"
                ) from None
            if name is None:
                raise ConfigError("Plugin.from_object(bytes): give name=, an identifier such as 'my_plugin'")
            origin = ""
        label = origin or f"plugin {name!r}"
        if not data:
            raise ConfigError(f"{label}: the object is empty")
        found = detect_kind(data)
        if kind is None:
            if found is None:
                if _looks_like_source(data):
                    raise ConfigError(
                        f"{label}: this is CUDA source, not a precompiled plugin: Plugin.from_file(path, twin=...) "
                        "or Plugin.from_source(name, text, twin=...) compiles it with NVRTC (or build an object "
                        "from it first: docs/api.md, precompiled plugins)"
                    )
                raise ConfigError(
                    f"{label}: not a precompiled plugin nvJitLink links (LTO-IR, PTX, CUBIN, fatbin, nvcc -dc "
                    f"object, static library); it begins {data[:8].hex(' ')}; pass kind= if it is one"
                )
            kind = found
        elif kind not in OBJECT_KINDS:
            raise ConfigError(f"{label}: kind={kind!r} must be one of {OBJECT_KINDS} (or None: told by the bytes)")
        elif found is not None and found != kind:
            raise ConfigError(f"{label}: kind={kind!r}, but the bytes are {KIND_NAMES[found]} ({found!r})")
        return cls(name, "", twin, origin, data, kind)

    def header(self) -> bytes:
        """What NVRTC compiles as ``gpuq_plugin.cuh``: the source after a ``#line`` directive, so that
        its messages give ``origin`` and the source's own line numbers.  ConfigError for a
        precompiled plugin (it is linked, not compiled)."""
        if self.precompiled:
            raise ConfigError(f"plugin {self.name!r} is precompiled ({self.kind}): it has no source to compile")
        origin = self.origin.replace("\\", "\\\\").replace('"', '\\"')
        return f'#line 1 "{origin}"\n{self.source}\n'.encode()

    def arches(self) -> list[str]:
        """What a precompiled plugin is built for, as far as its headers tell (:func:`object_arches`):
        e.g. ``["sm_90 (CUBIN)", "compute_90 (PTX)"]``; ``[]`` for source or where they do not say."""
        return object_arches(self.kind, self.binary) if self.precompiled else []

    @property
    def twin_keywords(self) -> tuple[str, ...]:
        """The optional keywords (``"params"``, ``"out_cap"``) the twin is given: those it names."""
        return self._twin_keywords

    def run_twin(self, payload, msg_id: int, params=_NO_PARAMS, out_cap: int | None = None) -> bytes:
        """The twin's result for one message, as bytes.

        params:  the per-queue parameters (bytes-like; a read-only memoryview reaches the twin),
                 given only to a twin that names ``params``; out_cap: the result capacity
                 (slot_bytes), given only to a twin that names ``out_cap`` (None where unknown).
        Raises Fail (the twin failed the message; the caller turns it into a status), ConfigError
        when there is no twin, TypeError when it returns something that is not bytes-like.
        """
        if self.twin is None:
            raise ConfigError(f"plugin {self.name!r} has no Python twin")
        if self._twin_keywords:
            extra = {"params": params if isinstance(params, memoryview) else memoryview(params), "out_cap": out_cap}
            result = self.twin(payload, msg_id, **{k: extra[k] for k in self._twin_keywords})
        else:
            result = self.twin(payload, msg_id)
        try:
            return bytes(memoryview(result))
        except TypeError:
            raise TypeError(
                f"plugin {self.name!r}: the twin returned {type(result).__name__}, not a bytes-like object"
            ) from None

    def __repr__(self) -> str:
        twin = getattr(self.twin, "__name__", "a twin") if self.twin is not None else "no twin"
        what = f", {KIND_NAMES[self.kind]} of {len(self.binary)} bytes" if self.precompiled else ""
        return f"<Plugin {self.name}{what} from {self.origin}, {twin}>"


# -- precompiled objects: what the bytes are -----------------------------------------------------

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
LTOIR_MAGIC = struct.pack("<I", 0x7F4E43ED)
AR_MAGIC = b"!<arch>\n"
_PTX_VERSION = re.compile(rb"^[ \t]*\.version[ \t]+\d+\.\d+", re.M)
_PTX_TARGET = re.compile(rb"^[ \t]*\.target[ \t]+(\w+)", re.M)
_FATBIN_ENTRY_KINDS = {1: ("compute", "PTX"), 2: ("sm", "CUBIN"), 8: ("lto", "LTO-IR")}


def detect_kind(data: bytes) -> str | None:
    """The kind (:data:`OBJECT_KINDS`) of a precompiled plugin's bytes, or None when none fits:
    ELF with machine 190 (EM_CUDA) a CUBIN, another ELF a host object (``nvcc -dc``), magic
    0xBA55ED50 a fatbin, 0x7F4E43ED LTO-IR, ``!<arch>`` a static library, text with PTX's
    ``.version`` and ``.target`` directives PTX."""
    head = bytes(data[:4])
    if head == ELF_MAGIC:
        return "cubin" if len(data) >= 20 and struct.unpack_from("<H", data, 18)[0] == EM_CUDA else "object"
    if head == FATBIN_MAGIC:
        return "fatbin"
    if head == LTOIR_MAGIC:
        return "ltoir"
    if bytes(data[:8]) == AR_MAGIC:
        return "library"
    text = bytes(data[:65536])
    if b"\0" not in text.rstrip(b"\0") and _PTX_VERSION.search(text) and _PTX_TARGET.search(text):
        return "ptx"
    return None


def _looks_like_source(data: bytes) -> bool:
    """UTF-8 text that mentions gpuq_process and no PTX directive: a plugin's CUDA source."""
    try:
        text = bytes(data[:65536]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "gpuq_process" in text and "\0" not in text and not _PTX_VERSION.search(data[:65536])


def _cubin_arch(data: bytes) -> str | None:
    """``sm_XY`` from a CUBIN's ELF header (e_flags: bits 8-15 in the CUDA 12.8+ ABI, OSABI 0x41;
    bits 0-7 before it), or None."""
    try:
        if data[4] == 2:  # ELFCLASS64
            flags = struct.unpack_from("<I", data, 48)[0]
        else:
            flags = struct.unpack_from("<I", data, 36)[0]
    except (IndexError, struct.error):
        return None
    sm = (flags >> 8) & 0xFF if data[7] == 0x41 else flags & 0xFF
    return f"sm_{sm}" if sm else None


def _fatbin_arches(data: bytes, start: int = 0) -> list[str]:
    """The entries of the fatbin at ``data[start:]``: ``["sm_90 (CUBIN)", "compute_90 (PTX)", ...]``."""
    out = []
    try:
        header_size = struct.unpack_from("<H", data, start + 6)[0]
        total = struct.unpack_from("<Q", data, start + 8)[0]
        off, end = start + header_size, min(len(data), start + header_size + total)
        while off + 32 <= end:
            entry_kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, off)
            arch = struct.unpack_from("<I", data, off + 28)[0]
            prefix, what = _FATBIN_ENTRY_KINDS.get(entry_kind, ("sm", f"kind {entry_kind}"))
            out.append(f"{prefix}_{arch} ({what})")
            if entry_header == 0:
                break
            off += entry_header + size
    except struct.error:
        pass
    return out


def object_arches(kind: str, data: bytes) -> list[str]:
    """What a precompiled plugin was built for, from its headers: a CUBIN's ELF flags, PTX's
    ``.target``, the entries of a fatbin (also the fatbins embedded in an ``nvcc -dc`` object or a
    library).  ``[]`` where they do not say (LTO-IR: nvJitLink checks it)."""
    if kind in ("cubin", "fatbin") and detect_kind(data) != kind:
        return []  # bytes given a kind they do not show (kind=): their headers say nothing
    if kind == "cubin":
        arch = _cubin_arch(data)
        return [f"{arch} (CUBIN)"] if arch else []
    if kind == "ptx":
        m = _PTX_TARGET.search(bytes(data[:65536]))
        return [f"{m.group(1).decode()} (PTX)"] if m else []
    if kind == "fatbin":
        return _fatbin_arches(data)
    if kind in ("object", "library"):
        out, at = [], data.find(FATBIN_MAGIC)
        while at >= 0:
            out += [a for a in _fatbin_arches(data, at) if a not in out]
            at = data.find(FATBIN_MAGIC, at + 4)
        return out
    return []


def _check_object(name: str, kind: str, data: bytes) -> None:
    """What can be refused before any link: a CUBIN that is not relocatable."""
    if kind == "cubin" and detect_kind(data) == "cubin" and struct.unpack_from("<H", data, 16)[0] != 1:
        raise ConfigError(
            f"plugin {name!r}: the CUBIN is not relocatable (built without -rdc=true), so its gpuq_process is "
            "gone; rebuild it with nvcc -cubin -rdc=true -arch=sm_XY (docs/api.md, precompiled plugins)"
        )


# -- the built-ins' twins ----------------------------------------------------------------------


def echo_twin(payload: memoryview, msg_id: int) -> memoryview:
    """``echo``: the payload itself."""
    return payload


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_twin(payload: memoryview, msg_id: int) -> bytes:
    """``crc32c``: the CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and final
    xor 0xFFFFFFFF) of the payload, 4 bytes little-endian.  A byte-table loop: ~5 MB/s."""
    crc, table = 0xFFFFFFFF, _CRC32C_TABLE
    for b in bytes(payload):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return (crc ^ 0xFFFFFFFF).to_bytes(4, "little")


SCORE_BAD_PAYLOAD = 1
"""``score`` failure code: the payload is empty or not a whole number of float32 (len % 4 != 0)."""
SCORE_BAD_PARAMS = 2
"""``score`` failure code: the params are empty, or not a whole number of rows of k float32
(params bytes % (4 k) != 0: not a [k, n] matrix for this payload's k)."""
SCORE_TOO_LARGE = 3
"""``score`` failure code: n scores (4 n bytes) do not fit in a result slot (4 n > slot_bytes)."""


def score_twin(payload: memoryview, msg_id: int, params: memoryview = _NO_PARAMS, out_cap: int | None = None) -> bytes:
    """``score``: the payload is a float32 vector x of k values (little-endian, 4 k bytes); the
    params a float32 matrix W of shape [k, n], row-major (C order), so n = params bytes / (4 k);
    the result is the n float32 scores x @ W (4 n bytes).  Fails the message (:class:`Fail`) with
    SCORE_BAD_PAYLOAD, SCORE_BAD_PARAMS or SCORE_TOO_LARGE, checked in that order, as the device
    does (device_src/plugins/score.cuh; its sums are fused multiply-adds in row order, so the two
    agree to float32 rounding, not bit for bit)."""
    m = memoryview(payload).nbytes
    if m == 0 or m % 4:
        raise Fail(SCORE_BAD_PAYLOAD)
    p = memoryview(params).nbytes
    if p == 0 or p % m:
        raise Fail(SCORE_BAD_PARAMS)
    k, n = m // 4, p // m
    if out_cap is not None and n > out_cap // 4:
        raise Fail(SCORE_TOO_LARGE)
    x = np.frombuffer(payload, "<f4")
    w = np.frombuffer(params, "<f4").reshape(k, n)
    return (x @ w).astype("<f4", copy=False).tobytes()


TWINS: dict[str, Twin] = {"echo": echo_twin, "crc32c": crc32c_twin, "score": score_twin}
"""Python twins of the built-in plugins in ``device_src/plugins``, by name."""


# -- lookup ------------------------------------------------------------------------------------


def _builtin_dir() -> Path:
    from . import compiler

    return compiler.DEVICE_SRC / "plugins"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The group's entry points by name; those whose name is not an identifier are left out (a
    Plugin's name is an identifier and must equal its entry point's, so they could never load)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name.isidentifier()}


def available() -> list[str]:
    """Names of the plugins :func:`resolve` finds: the built-ins and the entry points (none imported)."""
    return sorted({p.stem for p in _builtin_dir().glob("*.cuh")} | set(_entry_points()))


def _from_entry_point(ep: importlib.metadata.EntryPoint) -> Plugin:
    where = f"plugin={ep.name!r} (entry point {ep.value!r} of group {ENTRY_POINT_GROUP!r})"
    try:
        obj = ep.load()
        if not isinstance(obj, Plugin) and callable(obj):
            obj = obj()
    except Exception as exc:
        raise ConfigError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Plugin):
        raise ConfigError(f"{where} is a {type(obj).__name__}, not a gpuq_driver.plugins.Plugin")
    if obj.name != ep.name:
        raise ConfigError(f"{where} is named {obj.name!r}; the entry point and the Plugin must have one name")
    return obj


def resolve(plugin: str | Plugin, twin_for: str | None = None) -> Plugin:
    """The Plugin for a name or a Plugin (returned as is).

    twin_for: where the plugin will run without a GPU (e.g. ``"the simulator (backend='sim')"``):
              a plugin without a twin is then refused.
    Raises ConfigError naming ``plugin=``: not a str or Plugin, not an identifier, unknown (the
    message lists what exists), an entry point that fails to load, no twin where one is needed.
    """
    if isinstance(plugin, Plugin):
        found = plugin
    elif not isinstance(plugin, str) or not plugin.isidentifier():
        raise ConfigError(f"plugin={plugin!r} must be a plugin name such as 'echo', or a gpuq_driver.plugins.Plugin")
    else:
        path = _builtin_dir() / f"{plugin}.cuh"
        if path.is_file():
            found = Plugin(plugin, path.read_text(encoding="utf-8"), TWINS.get(plugin), f"plugins/{plugin}.cuh")
        else:
            ep = _entry_points().get(plugin)
            if ep is None:
                raise ConfigError(
                    f"plugin={plugin!r} is unknown: there are {available()} (device_src/plugins and entry "
                    f"points of group {ENTRY_POINT_GROUP!r}); or pass Plugin.from_source(...) / Plugin.from_file(...)"
                )
            found = _from_entry_point(ep)
    if twin_for is not None and found.twin is None:
        how = "Plugin.from_object(obj, twin=f)" if found.precompiled else "Plugin.from_source(name, source, twin=f)"
        raise ConfigError(
            f"plugin={found.name!r} has no Python twin, which {twin_for} runs in place of the device code: "
            f"give one ({how}, f(payload, msg_id) -> bytes) or run on the GPU"
        )
    return found
