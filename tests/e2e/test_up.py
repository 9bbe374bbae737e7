"""`fitserve up` as a user runs it: the whole stack from one command, supervised."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fitserve
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
FITSERVE = str(Path(sys.executable).parent / "fitserve")
BANNER = re.compile(
    r"fitserve up: ready; Ctrl-C stops the stack\n"
    r"  gRPC +127\.0\.0\.1:(?P<port>\d+)\n"
    r"  metrics +http://127\.0\.0\.1:(?P<metrics>\d+)/metrics\n"
    r"  Redis +redis://:\*\*\*@127\.0\.0\.1:(?P<redis>\d+)/0 \(password in \S+; log \S+\)\n"
    r"  data +(?P<data>\S+)\n"
    r"  auth +(?P<auth>.+)\n"
    r"  models +(?P<models>.+)\n"
    r"  processes +redis pid \d+, server pid (?P<server>\d+), worker pid (?P<worker>\d+)\n"
)
BANNER_LINES = 8
# What TensorFlow, CUDA, matplotlib and Celery print at start that nobody can act on.
NOISE = re.compile(
    r"oneDNN|cuInit|cuda drivers|SecurityWarning|superuser|Matplotlib|absl|computation placer"
    r"|cpu_feature_guard|AVX|-------------- |\[tasks\]",
    re.IGNORECASE,
)
WORKER_READY = "worker child ready"  # logged once the worker's pool child imported TensorFlow
SERVER_READY = "fitserve server listening"  # printed by the server, TensorFlow loaded


class Output:
    """Every line ``fitserve up`` prints (stdout and stderr), read as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc, self._stream = proc, proc.stdout
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # the end, for the waiters
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 180.0) -> int:
        """The index of the first line holding ``text``, once it is printed."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout,
            )
            for i, line in enumerate(self.lines):
                if text in line:
                    return i
        raise AssertionError(f"fitserve up never printed {text!r} ({found=}):\n" + self.text())

    def close(self) -> None:
        """Once the process has exited: the last lines read, the pipe closed."""
        self._thread.join(30)
        if not self._thread.is_alive():  # else a child still holds the pipe: leave it
            self._stream.close()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


class Stack:
    def __init__(self, proc: subprocess.Popen[str], output: Output) -> None:
        self.proc, self.output = proc, output
        start = output.wait_for("fitserve up: ready")
        output.wait_for("  processes ")
        banner = BANNER.search("\n".join(output.lines[start : start + BANNER_LINES]) + "\n")
        assert banner, "the banner says where everything is:\n" + output.text()
        self.before_banner = output.lines[:start]
        self.redis_port, self.port = int(banner["redis"]), int(banner["port"])
        self.metrics_port = int(banner["metrics"])
        self.server_pid, self.worker_pid = int(banner["server"]), int(banner["worker"])
        self.banner, self.banner_end = banner, start + BANNER_LINES
        self.auth_line = banner["auth"]


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


@contextmanager
def _up(tmp_path: Path, **env_vars: str) -> Iterator[Stack]:
    """``fitserve up`` as a user starts it: none of the tests' quieting variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FITSERVE_", "TF_CPP_"))}
    argv = [FITSERVE, "up", "--data-dir", str(tmp_path / "data"), "--port", "0"]
    argv += ["--metrics-port", "0"]
    proc = subprocess.Popen(
        argv,
        env=env | env_vars,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(proc)
    try:
        stack = Stack(proc, output)
        assert stack.port != 0
        assert stack.metrics_port != 0
        _wait_serving(stack.port, proc)
        yield stack
    finally:
        if proc.poll() is None:  # Ctrl-C: a SIGKILL would leave its children running
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with _up(tmp_path) as stack:
        yield stack


def _json_line(line: str) -> dict[str, object]:
    try:
        entry = json.loads(line)
    except ValueError:
        raise AssertionError(f"not a log line of the one (JSON) format: {line!r}") from None
    assert isinstance(entry, dict)
    assert {"time", "level", "logger", "message"} <= entry.keys(), line
    return entry


def test_up_prints_where_it_listens_then_only_the_log_in_one_format(stack: Stack) -> None:
    assert stack.before_banner == []  # the children's lines wait for the banner
    assert stack.banner["data"].endswith("/data")
    assert stack.banner["models"].startswith("none yet")
    # TensorFlow loaded in the worker's child and in the server
    ready = max(stack.output.wait_for(WORKER_READY), stack.output.wait_for(SERVER_READY))
    log = stack.output.lines[stack.banner_end : ready + 1]
    entries = [_json_line(line) for line in log]
    noisy = [line for line in log if NOISE.search(line)]
    assert noisy == []
    assert {e["logger"] for e in entries} >= {"fitserve.server", "fitserve.worker"}
    assert all(e["level"] != "DEBUG" for e in entries)
    root_lines = [e for e in entries if "running as root" in str(e["message"])]
    assert len(root_lines) == (1 if os.geteuid() == 0 else 0)
    assert all(e["level"] == "INFO" for e in root_lines)


def test_up_in_debug_brings_every_notice_back(tmp_path: Path) -> None:
    with _up(tmp_path, FITSERVE_LOG_LEVEL="debug", FITSERVE_LOG_FORMAT="text") as stack:
        ready = max(stack.output.wait_for(WORKER_READY), stack.output.wait_for(SERVER_READY))
        log = stack.output.lines[stack.banner_end : ready + 1]
        text_line = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")
        levels = {m.group(1) for m in map(text_line.match, log) if m}
        assert "DEBUG" in levels
        assert any(" tensorflow.native: " in line for line in log), "TF's C++ notices are back"
        assert any(" fitserve.worker: " in line and " -------------- " in line for line in log)
        stack.proc.send_signal(signal.SIGINT)
        assert stack.proc.wait(60) == 0


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
    assert (data / "redis" / "password").read_text().strip() not in stack.output.text()
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
