"""`fitserve serve --processes N`: N servers on one port, one aggregated /metrics, supervised."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from bench.models import MODEL, publish_reference
from service.launch.ready import wait_ready
from service.launch.serving import serve_argv, start_server
from service.launch.supervision import ChildExited, terminate
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
FITSERVE = str(Path(sys.executable).parent / "fitserve")
BANNER = re.compile(
    r"2 processes on 127\.0\.0\.1:(\d+) \(pids (\d+), (\d+)\); "
    r"aggregated metrics: http://127\.0\.0\.1:(\d+)/metrics \(from (\S+)\)"
)
WAIT = 120.0  # seconds; a bound on polls for two servers importing TensorFlow
REQUESTS = "fitserve_predict_requests_total"


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    pids: tuple[int, int]
    metrics_dir: Path


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Served]:
    """``serve --processes 2`` on ports it picks itself, once both children listen."""
    publish_reference(tmp_path / "data" / "models", versions=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    env |= {"FITSERVE_REDIS_URL": redis_url, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ready_file = tmp_path / "ready.json"
    argv = [FITSERVE, "serve", "--processes", "2", "--roles", "inference"]
    argv += ["--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "0"]
    argv += ["--ready-file", str(ready_file)]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pids: tuple[int, int] = (0, 0)
    try:
        banner = _banner(proc.stdout)
        pids = (int(banner.group(2)), int(banner.group(3)))
        (ready,) = wait_ready([ready_file], [("fitserve serve", proc)], WAIT)
        assert (ready.port, ready.metrics_port, ready.pid) == (
            int(banner.group(1)),
            int(banner.group(4)),
            proc.pid,
        )
        assert ready.port != 0
        yield Served(proc, ready.port, int(banner.group(4)), pids, Path(banner.group(5)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def _banner(stdout: IO[str]) -> re.Match[str]:
    """The supervisor's line naming its port and processes (the children share its stdout)."""
    for line in stdout:
        banner = BANNER.search(line)
        if banner:
            return banner
    raise AssertionError("fitserve serve did not print its processes")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _served_by(metrics_dir: Path, pid: int) -> float:
    """Predict calls one process answered OK, read from its own metrics file."""
    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists() or path.stat().st_size == 0:  # not there yet, or being created
        return 0.0
    families = MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
    return _ok(s for f in families for s in f.samples)


def _ok(samples: object) -> float:
    return sum(
        s.value
        for s in samples  # type: ignore[attr-defined]
        if s.name == REQUESTS and s.labels.get("code") == "OK" and s.labels["model"] == MODEL
    )


def _aggregated(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return _ok(s for f in families for s in f.samples)


def _gauges(metrics_port: int) -> set[str]:
    """Names of the per-version gauges the aggregated /metrics has for the model."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return {s.name for f in families for s in f.samples if s.labels.get("model") == MODEL}


def _predict_on_a_new_connection(port: int, x: np.ndarray) -> bool:
    """One Predict over its own TCP connection, so the kernel picks a process for it."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        try:
            fitserve.Client(channel=channel, timeout=30).predict(MODEL, x)
        except (fitserve.UnavailableError, fitserve.DeadlineExceededError):
            return False  # no process listens yet
    return True


def test_two_processes_share_the_port_and_metrics_add_up(served: Served) -> None:
    x = np.zeros((1, 28, 28), np.float32)
    answered = 0
    deadline = time.monotonic() + WAIT
    while min(_served_by(served.metrics_dir, pid) for pid in served.pids) == 0:
        assert time.monotonic() < deadline, "the calls did not reach both processes"
        assert served.proc.poll() is None, "fitserve serve exited"
        answered += _predict_on_a_new_connection(served.port, x)

    per_process = [_served_by(served.metrics_dir, pid) for pid in served.pids]
    assert sum(per_process) == answered
    assert _aggregated(served.metrics_port) == answered
    # the gauges read live in one process reach the aggregate too, sampled each second
    while not {"fitserve_predict_queue_depth", "fitserve_predict_in_flight"} <= _gauges(
        served.metrics_port
    ):
        assert time.monotonic() < deadline, "queue depth and in flight never aggregated"
        time.sleep(0.2)  # the polling period
    _runtime_metrics_of_every_process(served)

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0
    assert not any(_alive(pid) for pid in served.pids)


def _runtime_metrics_of_every_process(served: Served) -> None:
    """The served (aggregated) registry has process_* of the supervisor and of each
    child, by pid, build info, the children's Redis probe, and no _created series."""
    url = f"http://127.0.0.1:{served.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        samples = [
            s for f in text_string_to_metric_families(response.read().decode()) for s in f.samples
        ]
    rss = {s.labels["pid"] for s in samples if s.name == "process_resident_memory_bytes"}
    assert rss == {str(served.proc.pid), *(str(pid) for pid in served.pids)}
    assert any(s.name == "process_cpu_seconds_total" for s in samples)
    assert [s.value for s in samples if s.name == "fitserve_build_info"] == [1.0]
    assert [s.value for s in samples if s.name == "fitserve_redis_up"] == [1.0]
    assert not [s.name for s in samples if s.name.endswith("_created")]


def test_a_killed_server_process_brings_the_supervisor_down(served: Served) -> None:
    os.kill(served.pids[0], signal.SIGKILL)
    assert served.proc.wait(60) == 1
    assert not _alive(served.pids[1])


# ---- a port in use: only the processes of one `serve --processes N` share it ------------


def _env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    return env | {"FITSERVE_REDIS_URL": redis_url, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _api_server(tmp_path: Path, port: int, *more: str) -> list[str]:
    args = ["--roles", "api", "--data-dir", str(tmp_path / "data"), "--port", str(port)]
    return serve_argv(*args, "--metrics-port", "0", *more)


def _fails_to_start(argv: list[str], env: dict[str, str], log: Path) -> str:
    """Start a server that must exit before it listens; returns why it did (its output)."""
    try:
        proc, ready = start_server(argv, env, log, ROOT)
    except ChildExited as exc:
        code = exc.code
    else:
        terminate([proc])
        raise AssertionError(f"a second server started on port {ready.port}, sharing it")
    assert code == 1
    return log.read_text(errors="replace")


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_second_server_on_a_port_in_use_fails_at_start_naming_it(
    tmp_path: Path, redis_url: str
) -> None:
    env = _env(redis_url)
    first, ready = start_server(_api_server(tmp_path, 0), env, tmp_path / "first.log", ROOT)
    try:
        alone = _fails_to_start(_api_server(tmp_path, ready.port), env, tmp_path / "second.log")
        shared = _fails_to_start(
            _api_server(tmp_path, ready.port, "--processes", "2"), env, tmp_path / "third.log"
        )
        assert _serving(ready.port)  # the first one is untouched
    finally:
        terminate([first])

    for output in (alone, shared):
        assert f"fitserve serve: address in use: 127.0.0.1:{ready.port} is taken" in output
        assert "Traceback" not in output


def test_no_other_server_joins_the_port_of_serve_processes(
    served: Served, tmp_path: Path, redis_url: str
) -> None:
    env = _env(redis_url)

    alone = _fails_to_start(_api_server(tmp_path, served.port), env, tmp_path / "alone.log")
    group = _fails_to_start(
        _api_server(tmp_path, served.port, "--processes", "2"), env, tmp_path / "group.log"
    )

    for output in (alone, group):
        assert f"address in use: 127.0.0.1:{served.port}" in output
    assert served.proc.poll() is None
