"""The Stack as `fitserve up`, the tests and the benchmarks use it: real Redis, server and
worker; ports the server picked itself; stopping leaves nothing behind, Redis last."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.launch.stack import ServerPart, Stack, WorkerPart
from service.launch.supervision import ChildExited
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
WAIT = 60.0  # seconds; a bound on polls for a worker's pool child to start


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    return env | {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(ROOT),
        "FITSERVE_LOG_FORMAT": "text",
    }


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Watch:
    """Polls, in a thread, which of the stack's processes are gone; ``at_redis_exit`` is
    the set gone at the first moment Redis was seen gone."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.at_redis_exit = pids, set[str]()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            gone = {name for name, pid in self.pids.items() if _gone(pid)}
            if "redis" in gone:
                self.at_redis_exit = gone
                return
            time.sleep(0.001)


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _pool_children(worker: int) -> list[int]:
    deadline = time.monotonic() + WAIT
    while not (children := psutil.Process(worker).children()):
        assert time.monotonic() < deadline, "the worker started no pool child"
        time.sleep(0.1)
    return [c.pid for c in children]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    server = ServerPart(args=("--roles", "api"))
    with Stack(tmp_path, server=server, worker=WorkerPart(), env=_env(), cwd=ROOT) as running:
        yield running


def test_a_stack_serves_on_the_ports_its_server_reported(stack: Stack) -> None:
    assert stack.server is not None
    assert stack.ready is not None
    assert stack.ready.pid == stack.server.pid
    assert stack.port != 0
    assert stack.target == f"127.0.0.1:{stack.port}"
    assert _serving(stack.target)
    metrics = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(metrics, timeout=10) as response:
        assert b"fitserve_" in response.read()
    with redis.Redis.from_url(stack.redis_url) as client:
        assert client.ping()
    assert [name for name, _ in stack.children] == ["redis", "server", "worker"]
    assert stack.dead() is None


def test_stopping_ends_server_and_worker_before_redis_and_leaves_nothing(stack: Stack) -> None:
    assert stack.worker is not None
    pids = {name: proc.pid for name, proc in stack.children}
    pool = _pool_children(pids["worker"])
    watch = Watch(pids)

    stack.stop()
    watch.thread.join(120)

    assert watch.at_redis_exit == {"redis", "server", "worker"}  # both were gone already
    assert all(proc.returncode is not None for _, proc in stack.children)
    assert all(_gone(pid) for pid in pool)  # the worker's pool child too


def test_a_stack_on_a_given_redis_starts_none_and_names_its_dead_child(
    tmp_path: Path, redis_url: str
) -> None:
    with Stack(tmp_path, redis_url=redis_url, server=None, env=_env(), cwd=ROOT) as stack:
        assert stack.redis is None
        assert [name for name, _ in stack.children] == ["worker"]
        assert stack.worker is not None
        os.killpg(stack.worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while (dead := stack.dead()) is None:
            assert time.monotonic() < deadline, "the dead worker was not noticed"
            time.sleep(0.05)
        assert (dead.name, dead.code) == ("worker", -signal.SIGKILL)
        assert str(dead) == "worker exited with code -9"
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()  # not ours to stop


def test_a_server_that_dies_starting_fails_the_stack_at_once_naming_it(tmp_path: Path) -> None:
    stack = Stack(tmp_path, server=ServerPart(args=("--roles", "nonsense")), env=_env(), cwd=ROOT)
    started = time.monotonic()
    with pytest.raises(ChildExited) as exc:
        stack.start()

    assert exc.value.name == "server"
    assert str(exc.value).startswith("server exited with code 2 before it was ready; its log")
    # the end of its log says why, in one line
    assert "fitserve serve: FITSERVE_ROLES: Input should be 'api' or 'inference'" in str(exc.value)
    assert time.monotonic() - started < 60  # well before the ready timeout
    assert stack.redis is not None
    assert stack.worker is not None
    assert stack.redis.proc.returncode is not None  # what had started is stopped
    assert stack.worker.returncode is not None
