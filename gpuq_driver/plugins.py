"""Plugins: the processing function that the queue's kernel (and BatchProcessor) runs on each message.

A plugin is CUDA C++ source that defines the warp-cooperative device function ::

    __device__ __forceinline__ uint32_t gpuq_process(const uint8_t* __restrict__ in, uint32_t len,
                                                     uint8_t* __restrict__ out, uint32_t out_cap,
                                                     uint64_t msg_id, uint32_t lane);

called by all 32 lanes of one warp per message (``lane`` 0..31): ``in`` is the payload, ``len``
bytes (16-byte aligned, readable in whole 16-byte words); ``out`` the result buffer, ``out_cap``
(= ``slot_bytes``) bytes, 16-byte aligned; it returns the result length, the same on every lane.
It must write at most ``out_cap`` bytes; a returned length above ``out_cap`` is a BAD_RESULT
protocol error for that message (its result is empty, ``ProtocolError`` when taken).  The
contract is also in ``device_src/plugins/echo.cuh``.

A :class:`Plugin` carries a name, that source, and optionally a Python *twin*
``f(payload: memoryview, msg_id: int) -> bytes-like`` computing the same result, which the CPU
simulator (``backend="sim"``) and BatchProcessor's NumPy path run instead of the device code.

Where plugins come from (:func:`resolve` is the one lookup, used by QueueConfig, the kernel, the
simulator and BatchProcessor): a :class:`Plugin` object (:meth:`Plugin.from_source`,
:meth:`Plugin.from_file`), or a name: the built-ins ``device_src/plugins/<name>.cuh`` (``echo``,
``crc32c``; their twins are below), then entry points of the group ``gpuq_driver.plugins``, so that
a package can ship plugins::

    [project.entry-points."gpuq_driver.plugins"]
    rot13 = "my_package.gpuq:ROT13"   # a Plugin, or a function of no arguments returning one

Entry points are imported only when their name is looked up; a built-in's name wins over an entry
point's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENTRY_POINT_GROUP = "gpuq_driver.plugins"
"""The entry-point group in which installed packages name their plugins."""

HEADER_NAME = "gpuq_plugin.cuh"
"""The in-memory header that carries the plugin's source into NVRTC (``GPUQ_PLUGIN_FILE``)."""

Twin = Callable[[memoryview, int], Any]


@dataclass(frozen=True, repr=False)
class Plugin:
    """A processing function: CUDA source defining ``gpuq_process`` (see the module docstring).

    name:    an identifier, e.g. ``"crc32c"``: what errors and ``repr`` show.
    source:  the CUDA C++ text (compiled in, so it may ``#include`` CCCL headers such as
             ``<cuda/std/cstdint>``; ``uint8_t``/``uint32_t``/``uint64_t``/``uint4`` are defined).
    twin:    optional ``f(payload: memoryview, msg_id: int) -> bytes-like``, the same function in
             Python for the simulator and BatchProcessor's NumPy path; None = GPU only.
    origin:  the file name NVRTC's messages give, with line numbers of ``source`` itself: the path
             for :meth:`from_file`, ``"<name>.cuh"`` by default.

    Raises ConfigError for a name that is not an identifier, a source that is not a str or does
    not mention ``gpuq_process``, a twin that is not callable.
    """

    name: str
    source: str
    twin: Twin | None = None
    origin: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(f"Plugin name={self.name!r} must be an identifier such as 'my_plugin'")
        if not isinstance(self.source, str):
            raise ConfigError(f"plugin {self.name!r}: source must be a str, not {type(self.source).__name__}")
        if "gpuq_process" not in self.source:
            raise ConfigError(
                f"plugin {self.name!r}: the source does not define gpuq_process(in, len, out, out_cap, msg_id, lane)"
            )
        if self.twin is not None and not callable(self.twin):
            raise ConfigError(f"plugin {self.name!r}: twin must be callable(payload, msg_id) or None")
        if not self.origin:
            object.__setattr__(self, "origin", f"{self.name}.cuh")

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
        return cls(path.stem if name is None else name, source, twin, str(path))

    def header(self) -> bytes:
        """What NVRTC compiles as ``gpuq_plugin.cuh``: the source after a ``#line`` directive, so that
        its messages give ``origin`` and the source's own line numbers."""
        origin = self.origin.replace("\\", "\\\\").replace('"', '\\"')
        return f'#line 1 "{origin}"\n{self.source}\n'.encode()

    def run_twin(self, payload, msg_id: int) -> bytes:
        """The twin's result for one message, as bytes.  Raises ConfigError when there is no twin,
        TypeError when it returns something that is not bytes-like."""
        if self.twin is None:
            raise ConfigError(f"plugin {self.name!r} has no Python twin")
        result = self.twin(payload, msg_id)
        try:
            return bytes(memoryview(result))
        except TypeError:
            raise TypeError(
                f"plugin {self.name!r}: the twin returned {type(result).__name__}, not a bytes-like object"
            ) from None

    def __repr__(self) -> str:
        twin = getattr(self.twin, "__name__", "a twin") if self.twin is not None else "no twin"
        return f"<Plugin {self.name} from {self.origin}, {twin}>"


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


TWINS: dict[str, Twin] = {"echo": echo_twin, "crc32c": crc32c_twin}
"""Python twins of the built-in plugins in ``device_src/plugins``, by name."""


# -- lookup ------------------------------------------------------------------------------------


def _builtin_dir() -> Path:
    from . import compiler

    return compiler.DEVICE_SRC / "plugins"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


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
        raise ConfigError(
            f"plugin={found.name!r} has no Python twin, which {twin_for} runs in place of the device code: "
            "give one (Plugin.from_source(name, source, twin=f), f(payload, msg_id) -> bytes) or run on the GPU"
        )
    return found
