"""The embedded Redis asks for a password: made at random once, kept owner-only next to
its AOF, carried in its URL, never on a command line or in a printed URL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from service.launch.redis_server import (
    CONFIG_FILE,
    PASSWORD_FILE,
    RedisRefused,
    masked_url,
    start_redis,
    wait_for_redis,
)
from service.launch.stack import Stack
from service.launch.supervision import terminate
from tests.conftest import ROOT


def test_a_client_without_the_password_is_refused(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        with redis.Redis(port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with (
            redis.Redis(port=server.port, password="guess") as guessing,
            pytest.raises(redis.AuthenticationError),
        ):
            guessing.ping()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    finally:
        terminate([server.proc])


def test_the_password_is_kept_owner_only_and_survives_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    first = start_redis(folder)
    try:
        with redis.Redis.from_url(first.url) as client:
            client.set("kept", "yes")
    finally:
        terminate([first.proc])
    second = start_redis(folder)
    try:
        assert second.password == first.password
        assert len(second.password) >= 40  # 32 random bytes
        with redis.Redis.from_url(second.url, decode_responses=True) as client:
            assert client.get("kept") == "yes"  # the AOF replayed, same password
    finally:
        terminate([second.proc])
    assert (folder / PASSWORD_FILE).read_text().strip() == first.password
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in (PASSWORD_FILE, CONFIG_FILE):
        assert (folder / name).stat().st_mode & 0o777 == 0o600


def test_two_folders_get_different_passwords(tmp_path: Path) -> None:
    servers = [start_redis(tmp_path / name) for name in ("a", "b")]
    try:
        assert servers[0].password != servers[1].password
    finally:
        terminate([s.proc for s in servers])


def test_the_password_is_not_on_the_command_line_nor_in_reprs(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        args = subprocess.run(
            ["ps", "-o", "args=", "-p", str(server.proc.pid)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode()
        assert args.strip()
        assert server.password not in args
        assert server.password not in cmdline
        assert server.password not in repr(server)
        assert server.password in server.url
        assert masked_url(server.url) == f"redis://:***@127.0.0.1:{server.port}/0"
    finally:
        terminate([server.proc])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "rediss://fitserve:s3cret@redis.internal:6380/1",
            "rediss://fitserve:***@redis.internal:6380/1",
        ),
        (
            "rediss://redis.internal:6380/0?password=s3cret&ssl_ca_certs=/etc/ca.pem",
            "rediss://redis.internal:6380/0?password=***&ssl_ca_certs=/etc/ca.pem",
        ),
    ],
)
def test_masked_urls_show_everything_but_the_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown


def test_waiting_with_a_wrong_password_fails_at_once_without_showing_it(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        wrong = f"redis://:not-{server.password}@127.0.0.1:{server.port}/0"
        with pytest.raises(RedisRefused) as refused:
            wait_for_redis(wrong, timeout=30)
        assert str(refused.value).startswith(
            f"Redis at redis://:***@127.0.0.1:{server.port}/0 refused the connection"
        )
        assert server.password not in str(refused.value)
        with pytest.raises(RedisRefused, match="refused the connection"):
            wait_for_redis(f"redis://127.0.0.1:{server.port}/0", timeout=30)
    finally:
        terminate([server.proc])


def test_a_stack_passes_the_url_with_the_password_to_its_children(tmp_path: Path) -> None:
    with Stack(tmp_path, server=None, worker=None) as stack:
        assert stack.redis is not None
        assert stack.redis_url == stack.redis.url
        assert f":{stack.redis.password}@" in stack.redis_url
        with redis.Redis.from_url(stack.redis_url) as client:
            assert client.ping()


def test_fitserve_up_with_a_wrong_redis_password_says_so_without_showing_it(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
        env["FITSERVE_REDIS_URL"] = f"redis://:wrong-{server.password}@127.0.0.1:{server.port}/0"
        argv = [sys.executable, "-m", "service.main", "up", "--data-dir", str(tmp_path / "d")]
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        terminate([server.proc])
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"fitserve up: Redis at redis://:***@127.0.0.1:{server.port}/0 refused the connection"
    )
    assert server.password not in done.stderr + done.stdout
