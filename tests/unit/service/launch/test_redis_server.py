"""The embedded Redis finds a port by trying: a taken port (by anything, even another
Redis) costs a retry on another one, and the Redis it reports is its own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from service.launch.redis_server import ADDRESS_IN_USE, start_redis, wait_for_redis
from service.launch.supervision import ChildExited, terminate
from tests.conftest import refused_port


def _pid_at(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        return int(client.info("server")["process_id"])


def test_a_taken_port_is_retried_on_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_redis(tmp_path / "redis", ports=[port])
        try:
            assert server.port != port
            assert _pid_at(server.url) == server.proc.pid
            assert f"127.0.0.1:{port}: bind: {ADDRESS_IN_USE}" in server.log.read_text()
        finally:
            terminate([server.proc])


def test_a_port_held_by_another_redis_is_not_taken_for_ours(tmp_path: Path) -> None:
    first = start_redis(tmp_path / "first")
    try:
        second = start_redis(tmp_path / "second", ports=[first.port])
        try:
            assert second.port != first.port
            assert _pid_at(second.url) == second.proc.pid
            assert _pid_at(first.url) == first.proc.pid
        finally:
            terminate([second.proc])
    finally:
        terminate([first.proc])


def test_a_redis_that_fails_for_another_reason_is_not_retried(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "appendonly.aof").write_text("not an append-only file\n")
    with pytest.raises(ChildExited) as exc:
        start_redis(tmp_path / "redis")
    assert str(exc.value).startswith("redis-server exited with code 1; its log")
    assert "Bad file format reading the append only file" in str(exc.value)
    assert str(exc.value).count("Redis is starting") == 1  # one attempt only


def test_waiting_for_a_redis_that_is_not_there_times_out() -> None:
    with refused_port() as port, pytest.raises(TimeoutError, match=r"did not answer within 0\.3 s"):
        wait_for_redis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
