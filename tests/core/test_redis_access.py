"""The private Redis' access and memory settings: a generated password (0600, never on the command line) that
unauthenticated clients are refused without, and `maxmemory` with `noeviction`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from core.redis_server import PrivateRedis


def test_unauthenticated_clients_are_refused(redis_server: PrivateRedis) -> None:
    with redis.Redis(unix_socket_path=str(redis_server.socket_path)) as anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("x", "1")
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    wrong = redis.Redis(unix_socket_path=str(redis_server.socket_path), password="wrong")
    with wrong, pytest.raises(redis.AuthenticationError):
        wrong.ping()
    with redis.Redis.from_url(redis_server.url) as c:  # the URL carries the password
        assert c.ping()


def test_the_password_is_private_and_survives_restarts(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis", maxmemory="64mb")
    server.start()
    try:
        password = server.password
        assert password and len(password) >= 32
        for path in (server.password_file, server.config_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert server.pid is not None
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline  # `ps` must not show it
        with redis.Redis.from_url(server.url, decode_responses=True) as c:
            assert c.config_get("maxmemory") == {"maxmemory": str(64 * 2**20)}
            assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        server.restart()
        assert PrivateRedis(tmp_path / "redis").password == password
        with redis.Redis.from_url(server.url) as c:
            assert c.ping()
    finally:
        server.stop()


def test_a_bad_maxmemory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="maxmemory"):
        PrivateRedis(tmp_path / "r", maxmemory="lots")
