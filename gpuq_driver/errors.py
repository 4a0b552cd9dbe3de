"""The package's exceptions: one small tree, and the one status check every CUDA call goes through.

GpuqError
├── CudaError            a CUresult / nvrtcResult other than success (code, name, text)
│   └── CudaUnavailable  no CUDA driver, or no device
├── CompileError         NVRTC rejected a source, or nvJitLink a link (log, source, options)
├── ConfigError          a bad QueueConfig field (also a ValueError)
├── PayloadError         a payload too large for a slot (also a ValueError)
│   └── PayloadTypeError a payload that is not a contiguous bytes-like object (also a TypeError)
├── QueueFull            the ring stayed full for the whole timeout
├── QueueClosed          the queue was shut down or closed
├── KernelStopped        the persistent kernel stopped for good: what it has not done never will be
│   ├── KernelFault      a plugin trapped or accessed bad memory: the CUDA context is lost (cause, msg_id)
│   └── PluginHung       a plugin never returned (the watchdog): the kernel runs on, forever (msg_id)
├── ResultTimeout        no result within the timeout (also a TimeoutError)
├── UnknownMessage       a msg_id never issued or already taken (also a KeyError)
├── ProtocolError        the device saw a broken slot (a bug, not bad input)
├── MessageFailed        the plugin failed one message (GPUQ_FAIL(code) / plugins.Fail(code)); .msg_id, .code
└── BrokerError          Redis (Track A) refused a command or the login, no redis-server could be started,
    │                    or the client's connection pool is exhausted (max_connections)
    └── BrokerUnavailable  Redis cannot be reached (bad URL, server down, connection lost)
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any


class GpuqError(Exception):
    """Base of every error raised by gpuq_driver."""


class CudaError(GpuqError):
    """A CUDA driver or NVRTC call failed.

    Attributes: ``code`` (int), ``name`` (e.g. ``"CUDA_ERROR_OUT_OF_MEMORY"``), ``text`` (the
    driver's description), ``call`` (the function that failed, where known).
    """

    def __init__(self, code: int, name: str, text: str, call: str = ""):
        self.code, self.name, self.text, self.call = int(code), name, text, call
        where = f" in {call}" if call else ""
        super().__init__(f"{name} ({int(code)}){where}: {text}")


class CudaUnavailable(CudaError):
    """No usable CUDA driver or device on this machine (the queue cannot start here); the message
    says that ``QueueConfig(backend="sim")`` runs the same queue on the CPU simulator."""

    def __str__(self) -> str:
        return super().__str__() + ' (without a GPU, QueueConfig(backend="sim") runs the queue on the CPU simulator)'


class CompileError(GpuqError):
    """NVRTC could not compile ``source`` (``tool="NVRTC"``), or nvJitLink could not link it with a
    precompiled plugin (``tool="nvJitLink"``); ``log`` holds the tool's whole log (for nvJitLink,
    after a line that says what was wrong where it can tell: an undefined ``gpuq_process``, the
    plugin's arch); ``options`` the tool's options; ``plugin`` is the plugins.Plugin compiled or
    linked in (None if not known), whose compile errors the log gives by its file and lines."""

    def __init__(self, source: str, options: tuple[str, ...], log: str, plugin=None, tool: str = "NVRTC"):
        self.source, self.options, self.log, self.plugin, self.tool = source, tuple(options), log, plugin, tool
        if plugin is not None and getattr(plugin, "precompiled", False):
            with_plugin = f" with plugin {plugin.name!r} ({plugin.kind} from {plugin.origin})"
        else:
            with_plugin = f" with plugin {plugin.name!r} ({plugin.origin})" if plugin is not None else ""
        verb = "link" if tool == "nvJitLink" else "compile"
        super().__init__(f"{tool} failed to {verb} {source}{with_plugin} with {' '.join(options)}:\n{log}")


class ConfigError(GpuqError, ValueError):
    """A QueueConfig field is out of range; the message names the field and its limit."""


class PayloadError(GpuqError, ValueError):
    """A payload is larger than the slot (the message names its size and ``slot_bytes``)."""


class PayloadTypeError(PayloadError, TypeError):
    """A payload is not a C-contiguous bytes-like (buffer protocol) object."""


class QueueFull(GpuqError):
    """The ring stayed full for the whole enqueue timeout; nothing was enqueued."""


class QueueClosed(GpuqError):
    """The queue was shut down (no more enqueues) or closed (no more anything)."""


class KernelStopped(GpuqError):
    """The persistent kernel stopped for good (shut down or aborted, or it could not be launched
    again): messages it has not processed never will be."""

    def __copy__(self):
        """The copy each waiter raises keeps ``__cause__`` (on the simulator, the twin's own
        exception and its traceback)."""
        cls, args, *state = self.__reduce_ex__(2)
        new = cls(*args)
        if state and state[0]:
            new.__dict__.update(state[0])
        new.__cause__ = self.__cause__
        return new


class KernelFault(KernelStopped):
    """The kernel faulted: a plugin trapped (``__trap()``, a failed ``assert``) or read or wrote an
    address it must not, and the CUDA driver reported a sticky error (``CUDA_ERROR_ILLEGAL_ADDRESS``,
    ``CUDA_ERROR_LAUNCH_FAILED``, ``CUDA_ERROR_ILLEGAL_INSTRUCTION``, ...).  The device's CUDA context
    is lost for the whole process: every later CUDA call on that device fails (PyTorch and CuPy
    included); results already taken stay valid.  Restart the process; fix the plugin
    (compute-sanitizer finds the faulting access).  On the simulator: the plugin's twin raised
    (that exception is the ``__cause__``: the traceback shows where in the twin).

    Attributes: ``cause`` (the driver's error, or the twin's exception, as text), ``plugin`` (its
    name), ``device`` (the CUDA device ordinal; None on the simulator), ``msg_id`` (the oldest
    message not processed when the fault was seen; None where unknown), ``batch`` (in a
    BatchProcessor: the number of the batch, counting from 0; None in a queue).  Built by
    :func:`kernel_fault`.
    """

    def __init__(self, message: str = "", cause: str = "", plugin: str = "", device=None, msg_id=None, batch=None):
        super().__init__(message)
        self.cause, self.plugin, self.device, self.msg_id, self.batch = cause, plugin, device, msg_id, batch

    def __reduce__(self):
        return type(self), (str(self), self.cause, self.plugin, self.device, self.msg_id, self.batch)


class PluginHung(KernelStopped):
    """A plugin did not return within the watchdog (``QueueConfig.watchdog_ms``,
    ``BatchProcessor(watchdog_ms=...)``): no message finished while one waited for that long.  A
    running kernel cannot be interrupted: it keeps its device busy until the process exits, and
    every call that synchronises that device in this process (``cuCtxSynchronize``, ``cuMemFree``,
    module loads, ``torch.cuda.synchronize()``, ...) hangs meanwhile; results already taken stay
    valid.  Restart the process; fix the plugin (or raise ``watchdog_ms`` if it is only slow).  On
    the simulator: the plugin's twin did not return.

    Attributes: ``msg_id`` (the oldest message not processed: the one in the plugin; None in a
    BatchProcessor), ``batch`` (in a BatchProcessor, the number of the batch; None in a queue),
    ``seconds`` (how long nothing finished), ``watchdog_ms``, ``plugin``, ``device`` (None on the
    simulator).  Built by :func:`plugin_hung`.
    """

    def __init__(
        self,
        message: str = "",
        msg_id=None,
        seconds: float = 0.0,
        watchdog_ms: float = 0.0,
        plugin="",
        device=None,
        batch=None,
    ):
        super().__init__(message)
        self.msg_id, self.seconds, self.watchdog_ms, self.plugin = msg_id, seconds, watchdog_ms, plugin
        self.device, self.batch = device, batch

    def __reduce__(self):
        args = (str(self), self.msg_id, self.seconds, self.watchdog_ms, self.plugin, self.device, self.batch)
        return type(self), args


def _lost(msg_id, batch, messages) -> str:
    """What will never be processed."""
    if batch is not None:
        return f"batch {batch}{f' ({messages} messages)' if messages is not None else ''} has no results"
    if msg_id is None:
        return "messages not yet processed never will be"
    return f"msg_id {msg_id} and every later message will never be processed"


def kernel_fault(cause: str, plugin: str, device=None, msg_id=None, batch=None, messages=None) -> KernelFault:
    """The KernelFault for a kernel whose stream reported ``cause`` (a CUDA error, as text), or, with
    ``device=None``, a simulated kernel whose plugin twin raised (``cause``: what it raised, where).

    msg_id: the oldest message of a queue not processed; batch, messages: a BatchProcessor's batch
    number and size.  The message says what failed, what else in the process is affected and what
    to do; the backends differ only in the first sentence and the scope of the damage."""
    lost = _lost(msg_id, batch, messages)
    where = f"batch {batch} of a BatchProcessor" if batch is not None else "the queue's kernel"
    if device is None:
        text = (
            f"{'the NumPy path of ' + where if batch is not None else 'the simulated kernel'} faulted: the twin "
            f"of plugin {plugin!r} raised {cause}. On the GPU a plugin "
            "that faults (a trap, an illegal address) loses the CUDA context of its device for the whole "
            "process: every later CUDA call there fails, PyTorch and CuPy included; here only this "
            f"{'processor' if batch is not None else 'queue'} has stopped. Results already taken stay valid; "
            f"{lost}. Fix the plugin (its device code and its twin)."
        )
    else:
        text = (
            f"the CUDA context of device {device} is lost: {where} failed with {cause}. Most likely plugin "
            f"{plugin!r} trapped (__trap(), a failed assert) or read or wrote an address it must not (other "
            f"CUDA work in this process can cause it too). Every CUDA call on device {device} in this process "
            "fails from now on, PyTorch and CuPy included; results already taken stay valid; "
            f"{lost}. Restart the process to use the GPU again, and fix the plugin: run it under "
            "compute-sanitizer (compute-sanitizer python your_script.py) to find the faulting access."
        )
    return KernelFault(text, cause, plugin, device, msg_id, batch)


def _duration(seconds: float) -> str:
    """``"52 ms"`` below a second (watchdog_ms may be 1), ``"5.2 s"`` from there on."""
    return f"{seconds * 1e3:.0f} ms" if seconds < 1.0 else f"{seconds:.1f} s"


def plugin_hung(plugin: str, device, seconds: float, watchdog_ms: float, msg_id=None, batch=None, messages=None):
    """The PluginHung for a kernel (``device``: its ordinal; None: the simulator) in which nothing
    finished for ``seconds`` while ``msg_id`` (a queue's oldest message not processed) or ``batch``
    (a BatchProcessor's batch number, of ``messages`` messages) waited."""
    lost = _lost(msg_id, batch, messages)
    what = f"batch {batch}" if batch is not None else f"msg_id {msg_id} (the oldest message not processed)"
    inside = "the twin" if device is None else "the kernel"
    head = (
        f"plugin {plugin!r} did not return: {what} has been in {inside} for {_duration(seconds)} with no message "
        f"finished meanwhile (watchdog_ms={watchdog_ms:.10g}), so the "
        f"{'processor' if batch is not None else 'queue'} has stopped for good. "
    )
    if device is None:
        body = (
            "A thread cannot be interrupted: the simulator's thread stays in the twin (a daemon thread: "
            "the process can still exit). On the GPU the kernel would keep its device busy until the process "
            "exits, and every synchronising CUDA call in the process would hang meanwhile. "
        )
    else:
        body = (
            f"A running kernel cannot be interrupted: it keeps device {device} busy until this process exits, "
            f"and every call that synchronises device {device} in this process hangs meanwhile (cuCtxSynchronize, "
            "cuMemFree, module loads, torch.cuda.synchronize(), CuPy's first kernels). "
        )
    text = (
        head + body + f"Results already taken stay valid; {lost}. Restart the process; fix the plugin (a loop "
        "that never ends, a wait for a value nothing writes), or raise watchdog_ms if it is only slow "
        "(math.inf turns the watchdog off)."
    )
    return PluginHung(text, msg_id, seconds, watchdog_ms, plugin, device, batch)


class ResultTimeout(GpuqError, TimeoutError):
    """No result within the timeout; the message stays queued and its result can be taken later."""


class UnknownMessage(GpuqError, KeyError):
    """A msg_id that was never issued, or whose result was already taken."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class ProtocolError(GpuqError):
    """The device reported a slot that broke the protocol (GpuqCtrlDev.error)."""


class MessageFailed(GpuqError):
    """The plugin failed this message: its device code returned ``GPUQ_FAIL(code)``
    (device_src/gpuq_plugin_api.cuh), or its twin raised ``gpuq_driver.plugins.Fail(code)``.

    Raised when the result is taken (``try_dequeue_result``, ``wait_result``; in BatchProcessor,
    ``process``).  The message's slot is freed like any other; the queue and every other message go
    on, and it is not a protocol error (``shutdown`` does not report it).

    Attributes: ``msg_id``; ``code`` (0 .. 65535, the plugin's own meaning; the built-ins' codes are
    in gpuq_driver.plugins); ``plugin`` (its name).  From ``BatchProcessor.process`` also
    ``results`` (the whole batch's results in order: bytes, or None where a message got no result,
    the failed ones included) and ``failures`` ({index in the batch: code} of every failed message);
    None from a queue.
    """

    def __init__(self, msg_id: int, code: int, plugin: str = "", results: list | None = None, failures=None):
        self.msg_id, self.code, self.plugin = int(msg_id), int(code), plugin
        self.results, self.failures = results, failures
        text = f"msg_id {self.msg_id}: plugin {plugin!r} failed the message with code {self.code}"
        if failures is not None and len(failures) > 1:
            text += f" ({len(failures) - 1} more of the batch failed too: see .failures)"
        super().__init__(text)

    def __reduce__(self):
        return type(self), (self.msg_id, self.code, self.plugin, self.results, self.failures)


class BrokerError(GpuqError):
    """Redis refused a command or the login, no redis-server could be found or started, or the
    client's connection pool had no free connection (the message names its ``max_connections``) (Track A).

    ``url`` is the server's address (without password).  Where a producer had already been
    acknowledged by Redis for some entries, ``sent_ids`` holds their ids: those are stored.
    """

    def __init__(self, message: str, url: str = "", sent_ids: list | None = None):
        super().__init__(message)
        self.url, self.sent_ids = url, list(sent_ids or [])


class BrokerUnavailable(BrokerError):
    """Redis cannot be reached: a bad address, a server that is down, a connection lost mid-call."""


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as a plain int (numpy integers accepted, bool refused) within [lo, hi]; ConfigError
    naming the field and the limit otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an int, not {type(value).__name__} ({name}={value!r})") from None
    if value < lo or (hi is not None and value > hi):
        limit = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ConfigError(f"{name}={value} is out of range: {limit}")
    return value


def check_number(name: str, value, lo: float, hi: float = math.inf, unit: str = "", allow_inf: bool = False) -> float:
    """``value`` as a float (numpy numbers accepted; bool and NaN refused) with lo <= value <= hi,
    or ``math.inf`` where ``allow_inf``; ConfigError naming the field and the limit otherwise."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.nan
    if not (lo <= number <= hi or (allow_inf and number == math.inf)):
        limit = f"{name} >= {lo:g}" if hi == math.inf else f"{lo:g} <= {name} <= {hi:,.10g}"
        raise ConfigError(f"{name}={value!r} must be a number{unit}: {limit}" + (", or math.inf" if allow_inf else ""))
    return number


def check_name(name: str, value) -> str | bytes:
    """A Redis key or name: a non-empty str or bytes; ConfigError naming the field otherwise."""
    if not isinstance(value, (str, bytes)) or not value:
        raise ConfigError(f"{name}={value!r} must be a non-empty str or bytes")
    return value


def check_instance(name: str, value, cls, what: str):
    """``value`` if it is a ``cls``; ConfigError naming the field and what it must be otherwise."""
    if not isinstance(value, cls):
        raise ConfigError(f"{name} must be {what}, not {type(value).__name__}")
    return value


def check_seconds(name: str, value) -> float:
    """A duration in seconds >= 0 (math.inf allowed) as a float; ConfigError (a ValueError)
    naming the field otherwise."""
    return check_number(name, value, 0, math.inf, " of seconds", allow_inf=True)


def _enum_text(code: Any) -> tuple[str, str]:
    """(name, description) of a CUresult or nvrtcResult."""
    from cuda.bindings import driver, nvrtc

    if isinstance(code, nvrtc.nvrtcResult):
        err, text = nvrtc.nvrtcGetErrorString(code)
        return code.name, text.decode() if isinstance(text, bytes) else str(text)
    name = getattr(code, "name", str(code))
    try:
        err, text = driver.cuGetErrorString(code)
    except Exception:  # no driver library to ask
        return name, "(no CUDA driver loaded to describe this code)"
    if err != driver.CUresult.CUDA_SUCCESS or text is None:
        return name, "unknown error"
    return name, text.decode() if isinstance(text, bytes) else str(text)


_UNAVAILABLE = {
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_STUB_LIBRARY",
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
}


def check(result: Any, call: str = "") -> Any:
    """Unwrap a cuda-python return tuple ``(status, *values)``.

    Returns None, the single value, or a tuple of values.  Raises CudaError (CudaUnavailable for
    "no device" / "driver too old") when the status is not success, naming the code and its text.
    """
    if isinstance(result, tuple):
        status, values = result[0], result[1:]
    else:
        status, values = result, ()
    if int(status) != 0:
        name, text = _enum_text(status)
        cls = CudaUnavailable if name in _UNAVAILABLE else CudaError
        raise cls(int(status), name, text, call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values
