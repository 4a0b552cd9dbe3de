"""The host's hot path compiled: the common case of ``GpuQueue.enqueue`` and
``GpuQueue.try_dequeue_result`` in C (hostpath.c), built at first use, as the kernel is.

Why: each of the two calls costs ~0.8 µs of CPython on the H200 hosts, of which the stores and
loads are ~0.1 µs (``benchmarks/host_steps.py``).  Compiled, the 64 B round trip's p50 went from
5.98 to 4.25 µs with ``one_read=True``, from 5.27 to 3.90 µs with a scout and from 6.13 to 5.50 µs
with two reads (taken: 7.85 to 4.98, 7.03 to 4.62, 7.87 to 6.19; ``benchmarks/probe_host.py``, the
configurations interleaved in one run; docs/design.md "The compiled host path").

How: hostpath.c is compiled with the system's C compiler (``$CC``, default ``cc``) against this
Python's headers into a CPython extension module, cached beside the kernels' CUBINs
(``compiler.cache_dir()``/host, keyed by the source, the compiler's version and the Python ABI;
written atomically, with its SHA-256 beside it: a truncated or corrupt file is built again, a cache
folder that cannot be written builds into a temporary one), and bound to each GpuQueue (not a
subclass) whose ``result_memory`` is "host": the queue's
``enqueue`` and ``try_dequeue_result`` attributes become the compiled ones, which do exactly the
Python methods' common case on the queue's own state and call the Python methods for everything
else (hostpath.c says which).  ``GpuQueue.host_path`` says "compiled" or "python"; ``status()``
why.  Where no compiler or no headers are found, or the build fails, the queue runs its Python
methods, unchanged.  ``GPUQ_HOST_PATH=python`` never compiles; ``GPUQ_HOST_PATH=compiled`` makes
a queue that cannot have it raise GpuqError (for tests and benchmarks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from .errors import GpuqError, QueueClosed
from .layout import CHECK_LOW

SOURCE = Path(__file__).with_name("hostpath.c")
MODULE = "_gpuq_hostpath"
CFLAGS = ("-O2", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}  # "module": the loaded module or None, "why": the reason it is None


def mode() -> str:
    """``GPUQ_HOST_PATH``: "auto" (default), "python" or "compiled"."""
    value = os.environ.get("GPUQ_HOST_PATH", "auto").strip().lower() or "auto"
    if value not in ("auto", "python", "compiled"):
        raise GpuqError(f"GPUQ_HOST_PATH={value!r} must be 'auto', 'python' or 'compiled'")
    return value


def _compiler() -> tuple[list[str], str] | None:
    """(the command of ``$CC`` or ``cc``, split as a shell would: ``CC="ccache gcc"`` works; the
    first line of its ``--version``); None if there is none."""
    cmd = shlex.split(os.environ.get("CC", "cc"))
    path = shutil.which(cmd[0]) if cmd else None
    if path is None:
        return None
    try:
        out = subprocess.run([path, *cmd[1:], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [path, *cmd[1:]], (out.splitlines() or ["?"])[0]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(path: Path) -> bool:
    """The module at ``path`` is whole: its SHA-256 is the one written beside it when it was built
    (a truncated shared object can kill the process that loads it with SIGBUS)."""
    try:
        return path.with_suffix(".sha256").read_text().strip() == _digest(path)
    except OSError:
        return False


def _compile(cc: list[str], include: str, folder: Path, path: Path) -> str:
    """Compile hostpath.c to ``path`` (then its digest beside it), each written atomically: "" or why not."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        done = subprocess.run(
            [*cc, *CFLAGS, f"-I{include}", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(cc)} failed: {exc}"
    if done.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        said = (done.stderr or done.stdout).strip()[-500:]
        return f"{' '.join(cc)} failed (exit status {done.returncode}){': ' + said if said else ''}"
    digest = tmp.with_suffix(".sha256")
    digest.write_text(_digest(tmp))
    os.replace(tmp, path)  # atomic: another process may build the same key at once
    os.replace(digest, path.with_suffix(".sha256"))
    return ""


def _build():
    """(module, "") or (None, why)."""
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None, "free-threaded CPython (the compiled calls rely on the GIL to keep other threads out)"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return None, f"no Python headers in {include}"
    found = _compiler()
    if found is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')})"
    cc, version = found
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = hashlib.sha256(repr((SOURCE.read_bytes(), version, suffix, include, CFLAGS)).encode()).hexdigest()[:20]
    name = f"{MODULE}-{key}{suffix}"
    from .compiler import cache_dir

    cache = cache_dir()
    if cache is not None:
        path = cache / "host" / name
        if _cached(path):
            return _load(path), ""
        try:  # missing, truncated or corrupt: (re)build it there
            why = _compile(cc, include, path.parent, path)
            return (_load(path), "") if not why else (None, why)
        except OSError:  # a cache folder that cannot be written: build it for this process alone
            pass
    with tempfile.TemporaryDirectory() as scratch:  # loaded before it goes: the module stays mapped
        path = Path(scratch) / name
        why = _compile(cc, include, path.parent, path)
        return (_load(path), "") if not why else (None, why)


def module():
    """The compiled module, built or loaded once per process; None where it cannot be (``status()``
    says why) or ``GPUQ_HOST_PATH=python``."""
    if mode() == "python":
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"], _state["why"] = _build()
            except (OSError, ImportError) as exc:
                _state["module"], _state["why"] = None, f"could not build or load it: {exc}"
        return _state["module"]


def status() -> str:
    """ "compiled" or "python: <why>" for this process."""
    if mode() == "python":
        return "python: GPUQ_HOST_PATH=python"
    return "compiled" if module() is not None else f"python: {_state['why']}"


def _address(view) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def bind(q, slow_enqueue, slow_take):
    """The compiled enqueue and take for queue ``q`` (an object with ``.enqueue`` and ``.take``), or
    None where the queue runs its Python methods: no compiled module, or results in VRAM
    (``result_memory="device"``: the take copies them out with a CUDA call).  ``slow_enqueue`` and
    ``slow_take``: the Python methods, called for every case but the common one.  Raises GpuqError
    with ``GPUQ_HOST_PATH=compiled`` where it would be None."""
    mod = module() if q.config.result_memory == "host" else None
    why = None
    if q.config.result_memory != "host":
        why = "results in VRAM (result_memory='device')"
    elif mod is None:
        why = status()
    if why is not None:
        if mode() == "compiled":
            raise GpuqError(f"GPUQ_HOST_PATH=compiled, but this queue cannot have it: {why}")
        return None
    views = (q._req_data, q._req_hdr, q._doorbell, q._front, q._res_hdr, q._res_data, q._leaving)
    return mod.HostPath(
        weakref.ref(q),
        slow_enqueue,
        slow_take,
        q._leases,
        type(q._plock),
        QueueClosed,
        tuple(_address(v) for v in views),
        q._mask,
        q._sb,
        q._cap,
        q._lag,
        q._one_read,
        CHECK_LOW,
    )
