"""Ports children bind themselves: a reserved SO_REUSEPORT port takes no connection but lets
the listening children share it, and start_server returns the port its child reported."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from service.launch.serving import reserve_port, start_server
from service.launch.supervision import ChildExited, terminate
from tests.conftest import ROOT

LISTEN_AND_REPORT = (
    "import socket, sys; from pathlib import Path; from service.launch.ready import write_ready\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "write_ready(Path(sys.argv[-1]), s.getsockname()[1], None)\n"
    "conn, _ = s.accept(); conn.sendall(b'hello'); conn.close()\n"
    "import time; time.sleep(120)\n"
)


def _listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_reserved_port_refuses_connections_until_children_listen_on_it() -> None:
    with reserve_port("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        assert port != 0
        with socket.socket() as client:
            assert client.connect_ex(("127.0.0.1", port)) != 0  # nothing listens yet

        with _listener(port) as one, _listener(port) as two:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            accepted = 0
            for listener in (one, two):
                listener.setblocking(False)
                try:
                    listener.accept()[0].close()
                    accepted += 1
                except BlockingIOError:
                    pass
            assert accepted == 1  # one of the children got it, not the reservation


def test_a_reserved_port_cannot_be_bound_without_so_reuseport() -> None:
    with (
        reserve_port("127.0.0.1", 0) as held,
        socket.socket() as other,
        pytest.raises(OSError, match="Address already in use"),
    ):
        other.bind(("127.0.0.1", held.getsockname()[1]))


def test_start_server_returns_the_port_its_child_bound(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", LISTEN_AND_REPORT]
    proc, ready = start_server(argv, log=tmp_path / "child.log", cwd=ROOT)
    try:
        assert ready.pid == proc.pid
        with socket.create_connection(("127.0.0.1", ready.port), timeout=5) as conn:
            assert conn.recv(5) == b"hello"
    finally:
        terminate([proc])


def test_start_server_fails_at_once_with_the_log_of_a_child_that_died(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('no port for you'); raise SystemExit(2)"]
    with pytest.raises(ChildExited) as exc:
        start_server(argv, log=tmp_path / "child.log", timeout=60)
    assert str(exc.value).startswith("server exited with code 2 before it was ready; its log")
    assert str(exc.value).endswith("no port for you\n")
