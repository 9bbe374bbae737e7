"""`fitserve up` as a user runs it: the whole stack from one command, supervised."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fitserve
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
FITSERVE = str(Path(sys.executable).parent / "fitserve")
BANNER = re.compile(
    r"Redis at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0 \(password in \S+\); "
    r"gRPC on 127\.0\.0\.1:(\d+); metrics on port (\d+) "
    r"\(redis pid \d+, server pid (\d+), worker pid (\d+)\)"
)


class Stack:
    def __init__(self, proc: subprocess.Popen[str], banner: re.Match[str]) -> None:
        self.proc = proc
        self.redis_port, self.port, self.metrics_port = (int(banner.group(i)) for i in (1, 2, 3))
        self.server_pid, self.worker_pid = int(banner.group(4)), int(banner.group(5))
        self.banner = banner.string
        self.auth_line = ""  # the line after the banner: how calls authenticate


def _banner(stdout: IO[str]) -> re.Match[str]:
    """The line where ``fitserve up`` says where it listens (its children share its
    stdout, and the server may print first)."""
    for line in stdout:
        banner = BANNER.search(line)
        if banner:
            return banner
    raise AssertionError("fitserve up exited without printing where it listens")


def _wait_serving(port: int, proc: subprocess.Popen[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "fitserve up exited before serving"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError("fitserve up did not start serving")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    argv = [FITSERVE, "up", "--data-dir", str(tmp_path / "data"), "--port", "0"]
    argv += ["--metrics-port", "0"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        stack = Stack(proc, _banner(proc.stdout))
        stack.auth_line = next(line for line in proc.stdout if "calls need a token" in line)
        assert stack.port != 0
        assert stack.metrics_port != 0
        _wait_serving(stack.port, proc)
        yield stack
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_trains_serves_and_stops_cleanly(stack: Stack, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    y = (x.sum(axis=1) > 2).astype(np.int64)
    token_file = tmp_path / "data" / "admin.token"
    assert f"export FITSERVE_TOKEN=$(cat {token_file})" in stack.auth_line
    assert token_file.stat().st_mode & 0o777 == 0o600
    with (
        fitserve.Client(f"127.0.0.1:{stack.port}", timeout=30, token="") as anonymous,
        pytest.raises(fitserve.UnauthenticatedError),
    ):
        list(anonymous.list_models())
    token = token_file.read_text().strip()
    with fitserve.Client(f"127.0.0.1:{stack.port}", timeout=120, token=token) as client:
        ds = client.upload_dataset("tiny", x=x, y=y)
        result = client.train(
            "tiny",
            layers=[{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [4]}],
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=2,
            seed=0,
        ).wait(timeout=120)
        assert result.model_version == 1
        assert client.predict("tiny", x[:3]).shape == (3, 2)
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any(
        (tmp_path / "data" / "redis").glob("appendonlydir/*")
    )

    data = tmp_path / "data"
    assert (data / "redis" / "password").read_text().strip() not in stack.banner
    loose = [p for p in data.rglob("*") if p.stat().st_mode & 0o077]  # FITSERVE_UMASK 077
    assert loose == []
    assert any((data / "datasets").rglob("*.npz")), "the upload is among the files checked"

    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 0
    assert not _port_open(stack.port)
    assert not _port_open(stack.redis_port)
    assert not _alive(stack.server_pid)
    assert not _alive(stack.worker_pid)


def test_a_dead_child_brings_the_stack_down(stack: Stack) -> None:
    os.kill(stack.worker_pid, signal.SIGKILL)
    assert stack.proc.wait(60) == 1
    assert not _port_open(stack.port)
    assert not _port_open(stack.redis_port)
    assert not _alive(stack.server_pid)
