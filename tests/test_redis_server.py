"""gpuq_driver.streams.server against real redis-server processes: connect() and its errors (server
down, bad URL, wrong password, not Redis), RedisServer, find_redis_server.

Tests that talk to Redis take the ``redis_server`` fixture (tests/conftest.py): each runs once per
Redis version found, and skips with the reason where there is none (fails instead under
GPUQ_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from gpuq_driver import ConfigError
from gpuq_driver.errors import BrokerError, BrokerUnavailable
from gpuq_driver.streams import RedisServer, connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_names_the_url_without_password(redis_py):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with pytest.raises(BrokerUnavailable, match=re.escape(url)) as ei:
        connect(url)
    assert ei.value.url == url and ei.value.sent_ids == []
    for secret_url, shown in (
        (f"redis://:s3cret-pw@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0"),
        (f"redis://bob:s3cret-pw@127.0.0.1:{port}/0", f"redis://bob:***@127.0.0.1:{port}/0"),
    ):
        with pytest.raises(BrokerUnavailable) as ei:
            connect(secret_url)
        assert "s3cret-pw" not in str(ei.value) and "s3cret-pw" not in repr(ei.value.args)
        assert shown in str(ei.value) and ei.value.url == shown


def test_wrong_password_is_refused_login_without_password(redis_server):
    """The server is up and says no: BrokerError naming the login, not 'unreachable'."""
    url = redis_server.url.replace("redis://", "redis://bob:s3cret-pw@")
    with pytest.raises(BrokerError) as ei:
        connect(url)
    assert not isinstance(ei.value, BrokerUnavailable) and "refused the login" in str(ei.value)
    assert "s3cret-pw" not in str(ei.value) and "bob:***@" in str(ei.value)


def test_malformed_url_is_config_error(redis_py):
    with pytest.raises(ConfigError, match="http://x"):
        connect("http://x")
    with pytest.raises(ConfigError) as ei:
        connect("http://bob:s3cret-pw@x")
    assert "s3cret-pw" not in str(ei.value)
    with pytest.raises(ConfigError, match="decode_responses"):
        connect("redis://127.0.0.1:1/0", decode_responses=True)


def test_redis_server_lifecycle(redis_server):
    with RedisServer(redis_server.executable) as server:
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", server.url)
        assert server.version == redis_server.version and not server.closed
        assert connect(server.url).ping()
        assert server.url in repr(server)
    assert server.closed and "closed" in repr(server)
    server.close()  # twice is fine
    with pytest.raises(BrokerUnavailable):
        connect(server.url, socket_timeout_s=1.0)
    with pytest.raises(
        BrokerError, match="exited with status 1 before answering PING|No such file|not found|Permission|Errno"
    ):
        RedisServer("/bin/false", startup_timeout_s=2.0)


def test_connect_to_a_server_that_is_not_redis_is_broker_error(redis_py):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve():  # an HTTP server: one answer per connection, then close
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            except OSError:
                pass
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(BrokerError) as ei:
            connect(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2)
        assert not isinstance(ei.value, BrokerUnavailable) and f"127.0.0.1:{port}" in str(ei.value)
    finally:
        listener.close()


def test_connect_argument_errors_are_config_errors(redis_server):
    for url in ("redis://:s3cret-pw@127.0.0.1:99999/0", "redis://bob:s3cret-pw@127.0.0.1:99999/0"):
        with pytest.raises(ConfigError) as ei:
            connect(url)
        assert "s3cret-pw" not in str(ei.value) and "99999" in str(ei.value)
    for timeout in (0, 0.0, -1):
        with pytest.raises(ConfigError, match="socket_timeout_s="):
            connect(redis_server.url, socket_timeout_s=timeout)


def test_find_redis_server_honours_env_strictly(monkeypatch, tmp_path):
    from gpuq_driver.streams import find_redis_server

    missing = str(tmp_path / "no-such-redis-server")
    monkeypatch.setenv("GPUQ_REDIS_SERVER", missing)
    with pytest.raises(BrokerError, match=re.escape(missing)):
        find_redis_server()
    monkeypatch.setenv("GPUQ_REDIS_SERVER", str(tmp_path))  # a folder is not an executable
    with pytest.raises(BrokerError, match=re.escape(str(tmp_path))):
        find_redis_server()


def test_find_redis_server_takes_the_newest(monkeypatch, tmp_path, redis_server):
    from gpuq_driver.streams import find_redis_server
    from gpuq_driver.streams.server import redis_server_binaries, redis_server_version

    monkeypatch.delenv("GPUQ_REDIS_SERVER", raising=False)
    found = {exe: redis_server_version(exe) for exe in redis_server_binaries()}
    found = {exe: v for exe, v in found.items() if v}
    assert found, "the redis_server fixture found a binary, find_redis_server's helpers did not"
    assert redis_server_version(find_redis_server()) == max(found.values())
    if len(set(found.values())) < 2:
        return
    # the oldest first on PATH, the newest last: still the newest
    oldest, newest = min(found, key=found.get), max(found, key=found.get)
    for name, exe in (("old", oldest), ("new", newest)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "redis-server").symlink_to(exe)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "old"), str(tmp_path / "new"), os.environ["PATH"]]))
    assert os.path.realpath(find_redis_server()) == os.path.realpath(newest)


def test_redis_server_closed_once_its_process_is_killed(redis_server):
    server = RedisServer(redis_server.executable)
    try:
        assert not server.closed
        os.kill(server._proc.pid, signal.SIGKILL)
        server._proc.wait(10)
        assert server.closed and "closed" in repr(server)
    finally:
        server.close()
    assert server.closed


def test_redis_server_that_exits_at_once_says_so_with_its_status(redis_py):
    """Issue 10 item 8: a binary that is not redis-server exits at once: say so, with the status,
    rather than waiting out the PING timeout; a negative startup timeout is refused."""
    import shutil

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary on this machine")
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match=r"exited with status 1 before answering PING; its log:\n\(empty\)"):
        RedisServer(false)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="startup_timeout_s"):
        RedisServer(false, startup_timeout_s=-1)
