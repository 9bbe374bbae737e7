"""A server process SIGTERMed under load (issue 13): it reports NOT_SERVING and goes on
serving through the drain, loses none of the Predicts sent before a signal (not even those
still queued in gRPC's core, which gRPC's own shutdown cancels), ends WatchJob and health
Watch streams at once with UNAVAILABLE instead of holding the grace, and exits 0; an SDK
watcher moves on to the second server and sees every event of its job exactly once.

The server under test (A: api and inference) and the second one (B: api) are real
``fitserve serve`` processes started by the launch code, on a Redis of this test's own
(so no worker runs the job: it stays QUEUED until the test cancels it) and the session's
data folder (for the model, trained on the session's worker). Calls "under load" are made
by freezing A with SIGSTOP while they are sent, so they wait in its gRPC core when the
signal lands, as on a saturated machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fitserve
from fitserve.v1 import training_pb2, training_pb2_grpc
from service.config import Settings
from service.launch.serving import serve_argv, start_server
from service.launch.stack import Stack
from service.launch.supervision import terminate
from tests.conftest import ROOT
from tests.integration.test_inference import _train

pytestmark = pytest.mark.integration
DRAIN = 120.0  # s; longer than the test needs: it cuts the drain short with a second signal
GRACE = 40.0  # s; the test waits less than this for the exit, so no stream may hold it
WAIT = 60.0  # s; a bound on polls for what should happen soon
MODEL = "drain-model"
CALLS = 8  # Predicts sent while the server is frozen, before each signal
LAYERS = [{"type": "Dense", "units": 2, "activation": "softmax", "input_shape": [3]}]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Stream:
    """A stream read in a thread: what it sent, as it comes, and how it ended (the gRPC
    error of a raw stream, the SDK's error of ``Job.events()``; None when it ended)."""

    items: list[Any] = field(default_factory=list)
    error: Any = None
    done: threading.Event = field(default_factory=threading.Event)

    def follow(self, items: Iterable[Any]) -> Stream:
        def run() -> None:
            try:
                for item in items:
                    self.items.append(item)
            except Exception as exc:  # the test looks at it
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()
        return self


@dataclass
class Predicts:
    """Predict calls in threads, each sent at once; their outcomes once joined."""

    threads: list[threading.Thread] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    def send(self, sdk: fitserve.Client, x: np.ndarray, calls: int) -> Predicts:
        def one() -> None:
            try:
                self.outcomes.append(f"OK {sdk.predict(MODEL, x).shape}")
            except fitserve.FitserveError as exc:
                self.outcomes.append(f"{exc.code}: {exc.details}")

        self.threads = [threading.Thread(target=one, daemon=True) for _ in range(calls)]
        for thread in self.threads:
            thread.start()
        return self

    def results(self) -> list[str]:
        for thread in self.threads:
            thread.join(WAIT)
        return self.outcomes


def _poll(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # the polling period


def _env(redis_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    return env | {
        "FITSERVE_REDIS_URL": redis_url,
        "FITSERVE_DATA_DIR": str(data_dir),
        "FITSERVE_LOG_FORMAT": "text",
        "FITSERVE_SHUTDOWN__DRAIN_SECONDS": str(DRAIN),
        "FITSERVE_SHUTDOWN__GRACE_SECONDS": str(GRACE),
        "FITSERVE_INFERENCE__RELOAD_POLL_SECONDS": "3600",
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture
def servers(
    tmp_path: Path,
    settings: Settings,
    client: fitserve.Client,
    digits: tuple[np.ndarray, np.ndarray],
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """A (api and inference) and B (api) on a Redis of their own: the process of A, and
    both ports."""
    _train(client, digits, MODEL)
    with Stack(tmp_path / "redis", server=None, worker=None) as redis:
        env = _env(redis.redis_url, settings.data_dir)
        argv = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
        a, ready_a = start_server(
            serve_argv(*argv, "--roles", "api,inference"), env, tmp_path / "a.log", ROOT
        )
        procs = [a]
        try:
            b, ready_b = start_server(  # B is only stopped at the end: no drain
                serve_argv(*argv, "--roles", "api"),
                env | {"FITSERVE_SHUTDOWN__DRAIN_SECONDS": "0"},
                tmp_path / "b.log",
                ROOT,
            )
            procs.append(b)
            yield a, ready_a.port, ready_b.port
        finally:
            terminate(procs, timeout=5)


def _frozen_while(
    proc: subprocess.Popen[bytes], send: Callable[[], Predicts], sig: int
) -> Predicts:
    """Freeze ``proc``, send calls to it, signal it, thaw it: the calls wait in its gRPC
    core (sent, not yet taken) when it handles the signal."""
    proc.send_signal(signal.SIGSTOP)
    try:
        calls = send()
        time.sleep(0.5)  # lets the client threads write their calls; no assertion on time
        proc.send_signal(sig)
    finally:
        proc.send_signal(signal.SIGCONT)
    return calls


def test_a_sigtermed_server_drains_serves_every_call_sent_ends_streams_and_exits_0(
    servers: tuple[subprocess.Popen[bytes], int, int],
    digits: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    a, port_a, port_b = servers
    x = digits[0][:1]
    with (
        grpc.insecure_channel(f"127.0.0.1:{port_a}") as to_a,
        # The second server as a load balancer would offer it: pick_first takes A while
        # it listens, and B once A has gone.
        fitserve.Client(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}", timeout=30) as both,
    ):
        on_a = fitserve.Client(channel=to_a, timeout=WAIT)  # no retries: every outcome shows
        assert on_a.predict(MODEL, x).shape == (1, 10)  # loaded and warm
        dataset = both.upload_dataset("drain-data", x=np.zeros((4, 3), np.float32), y=np.zeros(4))
        job = both.train(
            "drain-job", layers=LAYERS, loss="sparse_categorical_crossentropy", dataset=dataset
        )
        sdk = Stream().follow(job.events())
        sdk_events = sdk.items
        watch = health_pb2_grpc.HealthStub(to_a).Watch(health_pb2.HealthCheckRequest(service=""))
        health = Stream().follow(reply.status for reply in watch)
        raw_watch = Stream().follow(
            training_pb2_grpc.TrainingServiceStub(to_a).WatchJob(
                training_pb2.WatchJobRequest(job_id=job.id)
            )
        )
        _poll(lambda: len(sdk_events) >= 1 and len(raw_watch.items) >= 1, "the job's first event")
        _poll(lambda: SERVING in health.items, "health SERVING")

        # SIGTERM with Predicts waiting in A's queue: A drains (health NOT_SERVING) and
        # goes on serving, the queued calls and new ones alike.
        before_sigterm = _frozen_while(a, lambda: Predicts().send(on_a, x, CALLS), signal.SIGTERM)
        sigterm = time.monotonic()
        _poll(lambda: NOT_SERVING in health.items, "health NOT_SERVING on the Watch stream")
        print(
            f"\nSIGTERM until NOT_SERVING on the Watch stream: {time.monotonic() - sigterm:.2f} s"
        )
        checked = health_pb2_grpc.HealthStub(to_a).Check(health_pb2.HealthCheckRequest())
        assert checked.status == NOT_SERVING
        assert on_a.predict(MODEL, x).shape == (1, 10)  # a new call, served in the drain
        assert before_sigterm.results() == [f"OK {(1, 10)}"] * CALLS
        assert a.poll() is None
        assert not raw_watch.done.is_set()  # streams stay open through the drain

        # A second signal ends the drain: the server stops with Predicts still queued,
        # which are served, not cancelled; the open streams end at once.
        before_stop = _frozen_while(a, lambda: Predicts().send(on_a, x, CALLS), signal.SIGINT)
        signalled = time.monotonic()
        assert a.wait(GRACE - 10) == 0  # well within the grace: no stream held it
        print(f"\nsecond signal until the server exited: {time.monotonic() - signalled:.2f} s")
        assert before_stop.results() == [f"OK {(1, 10)}"] * CALLS

        assert health.done.wait(WAIT)
        assert raw_watch.done.wait(WAIT)
        assert health.items == [SERVING, NOT_SERVING]
        for stream in (health, raw_watch):
            assert stream.error is not None
            assert stream.error.code() == grpc.StatusCode.UNAVAILABLE
            details = stream.error.details() or ""
            assert "this server is shutting down" in details, details
            assert "after_event_id" in details, details
        log = (tmp_path / "a.log").read_text(errors="replace")
        ended = re.search(r"ending (\d+) open streams", log)
        assert ended is not None, log[-3000:]
        assert int(ended.group(1)) >= 3  # the SDK's watcher too
        assert "stopping cancels them" not in log

        # The SDK's watcher moved on to B: the job's later events reach it there.
        both.cancel_job(job.id)
        assert sdk.done.wait(WAIT)
        assert sdk.error is None, sdk.error
        whole = list(job.events())

    ids = [e.event_id for e in sdk_events]
    assert ids == [e.event_id for e in whole]  # every event, once, in order
    assert whole[-1].state_changed.state == training_pb2.JOB_STATE_CANCELLED
