"""Following a job across an infrastructure outage longer than the SDK's old five retries
(~6.2 s): an api server stopped and restarted on its port, and Redis restarted. The SDK
watcher and `fitserve jobs watch` retry for their time budget and resume from the last
event id, so each sees every event of the job exactly once, in order.

Each test runs a stack of its own (Redis, and for the server restart a server process on
a fixed port and a worker), so the session's parts never see the outage.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import fitserve
from fitserve import cli
from fitserve.v1 import training_pb2
from service.config import Settings
from service.launch.redis_server import start_redis
from service.launch.serving import serve_argv, start_server
from service.launch.stack import ServerPart, Stack, WorkerPart
from service.launch.supervision import terminate
from tests.conftest import ROOT, run_server, stop_server

pytestmark = pytest.mark.integration
OUTAGE_SECONDS = 10.0
EPOCHS = 40
EPOCH_SECONDS = 0.5  # a job of ~20 s: it runs on while the api server is down
PLUGINS = "tests.plugins.outages"
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]


@dataclass
class Watcher:
    """A thread following a job through the SDK, recording each event as it comes."""

    job: fitserve.Job
    events: list[training_pb2.JobEvent] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.events.extend(self.job.events())
        except BaseException as exc:  # the test reports it
            self.error = exc

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watcher did not see the job end"
        assert self.error is None, repr(self.error)

    def wait_for(self, predicate: object, timeout: float) -> None:
        until = time.monotonic() + timeout
        while not any(predicate(e) for e in list(self.events)):  # type: ignore[operator]
            assert self.error is None, repr(self.error)
            assert time.monotonic() < until, "the expected event did not come"
            time.sleep(0.1)  # polling a list another thread fills


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        FITSERVE_LOG_FORMAT="text",
        FITSERVE_PLUGINS=PLUGINS,
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
    )


def _ids(events: list[training_pb2.JobEvent]) -> list[str]:
    return [e.event_id for e in events]


def _epochs(events: list[training_pb2.JobEvent]) -> list[int]:
    return [e.epoch_ended.epoch for e in events if e.HasField("epoch_ended")]


def _cli_watch(target: str, job_id: str, out: Path) -> subprocess.Popen[bytes]:
    """`fitserve jobs watch` in a process of its own, its stdout to ``out`` (stderr beside)."""
    fitserve_cli = Path(sys.executable).with_name("fitserve")
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        return subprocess.Popen(
            [str(fitserve_cli), "--target", target, "jobs", "watch", job_id],
            stdout=stdout,
            stderr=stderr,
            env=dict(os.environ, FITSERVE_TOKEN=""),
        )


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Stack]:
    """Redis, a worker and an api server on a fixed port, in a stack of this test's own."""
    part = ServerPart(port=_free_port(), args=("--roles", "api"))
    stack = Stack(tmp_path, server=part, worker=WorkerPart(), env=_env(), cwd=ROOT)
    with stack:
        yield stack


def test_watchers_see_every_event_once_across_an_api_server_restart(
    restartable: Stack, tmp_path: Path
) -> None:
    stack = restartable
    with fitserve.Client(stack.target, timeout=30) as client:
        x = np.random.default_rng(0).random((64, 3), dtype=np.float32)
        ds = client.upload_dataset("outage-data", x=x, y=x.argmax(axis=1) % 2)
        job = client.train(
            "outage",
            layers=LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=EPOCHS,
            callbacks={"plugins": [{"name": "outages>SlowEpochs", "seconds": EPOCH_SECONDS}]},
        )
        watcher = Watcher(job).start()
        cli_out = tmp_path / "cli-watch.txt"
        cli_proc = _cli_watch(stack.target, job.id, cli_out)
        try:
            watcher.wait_for(lambda e: e.HasField("epoch_ended"), timeout=180)

            assert stack.server is not None
            terminate([stack.server])  # SIGTERM: the server stops as in a deploy
            stopped = time.monotonic()
            down = [time.time()]
            seen_before = len(watcher.events)
            time.sleep(OUTAGE_SECONDS)
            argv = serve_argv("--host", "127.0.0.1", "--port", str(stack.port), "--roles", "api")
            argv += ["--metrics-port", "0"]
            stack.server, _ = start_server(argv, stack._env({}), tmp_path / "server-2.log", ROOT)
            restarted = time.monotonic()
            down.append(time.time())

            watcher.join(timeout=180)
            assert cli_proc.wait(timeout=60) == 0, cli_out.with_suffix(".err").read_text()
        finally:
            cli_proc.kill()
        final = job.refresh()
        whole = list(job.events())  # the job's stream as the server keeps it

    assert restarted - stopped >= OUTAGE_SECONDS  # well past the old ~6.2 s of retries
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED
    assert _ids(watcher.events) == _ids(whole)  # every event, once, in order
    assert len(set(_ids(whole))) == len(whole)
    assert _epochs(watcher.events) == list(range(1, EPOCHS + 1))
    during = [e for e in whole if down[0] < e.time.ToNanoseconds() / 1e9 < down[1]]
    assert len(during) > 5  # the job went on while the server was down
    assert len(watcher.events) > seen_before
    lines = cli_out.read_text().splitlines()
    printed = [line for line in lines if not line.startswith("job ")]
    assert printed == [cli._describe_event(e) for e in whole], "\n".join(lines)
    assert lines[-1] == f"job {job.id} SUCCEEDED (version 1)"


def test_a_watcher_sees_every_event_once_across_a_redis_restart(tmp_path: Path) -> None:
    with Stack(tmp_path, server=None, worker=None) as stack:  # Redis alone
        assert stack.redis is not None
        settings = Settings(
            data_dir=tmp_path / "data",
            redis_url=stack.redis_url,
            port=0,
            metrics_port=0,
            log_format="text",
            grace_seconds=1.0,
        )
        running, thread = run_server(settings)  # no worker: the job stays queued
        try:
            with fitserve.Client(running.target, timeout=30) as client:
                ds = client.upload_dataset(
                    "redis-data", x=np.zeros((4, 3), np.float32), y=np.zeros(4)
                )
                job = client.train(
                    "redis-outage",
                    layers=LAYERS,
                    loss="sparse_categorical_crossentropy",
                    dataset=ds,
                )
                watcher = Watcher(job).start()
                watcher.wait_for(lambda e: e.HasField("state_changed"), timeout=30)

                port, folder = stack.redis.port, tmp_path / "redis"
                terminate([stack.redis.proc])  # Redis gone: WatchJob answers UNAVAILABLE
                time.sleep(OUTAGE_SECONDS)
                stack.redis = start_redis(folder, ports=(port,))  # same port, same AOF
                _cancel_when_redis_answers(client, job.id)

                watcher.join(timeout=60)
                whole = list(job.events())
        finally:
            stop_server(running, thread)

    states = [e.state_changed.state for e in watcher.events]
    assert _ids(watcher.events) == _ids(whole)
    assert states[0] == training_pb2.JOB_STATE_QUEUED
    assert states[-1] == training_pb2.JOB_STATE_CANCELLED
    assert len(set(_ids(whole))) == len(whole)


def _cancel_when_redis_answers(client: fitserve.Client, job_id: str) -> None:
    until = time.monotonic() + 30
    while True:
        try:
            client.cancel_job(job_id)
            return
        except fitserve.UnavailableError:
            assert time.monotonic() < until, "Redis did not come back"
            time.sleep(0.2)  # Redis reloads its AOF, the server reconnects
