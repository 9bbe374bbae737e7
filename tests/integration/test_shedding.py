"""Load shedding on a real server: a fresh server with a few calls queued in gRPC's core
sheds none of them (the old estimate read 3 queued calls as 3000 ms on a server that had
just started, and shed them). That real overload still sheds is
test_inference.py::test_calls_waiting_in_grpcs_queue_are_shed_and_control_calls_never_are;
the decision itself, with clocks the tests control, is tests/unit/service/api/test_gate.py
and test_backlog.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import fitserve
from service.config import Settings
from tests.conftest import RunningServer
from tests.integration.test_inference import _inference_server, _metric, _train

pytestmark = pytest.mark.integration
MODEL = "shed-fresh"
CALLS = 6  # a few: what a restart finds queued
ROUNDS = 3
FREEZE = 0.03  # s the server's event loop is held while the calls arrive: under the bound
WAIT = 60.0


def _freeze(running: RunningServer, seconds: float) -> None:
    """Hold the server's event loop for ``seconds``, so calls arriving meanwhile wait in
    gRPC's core; returns once it is held."""
    held = threading.Event()

    def hold() -> None:
        held.set()
        time.sleep(seconds)  # the loop is stuck here, as behind a slow start-up step

    running.loop.call_soon_threadsafe(hold)
    assert held.wait(WAIT)


def test_a_fresh_server_with_a_few_queued_calls_sheds_none(
    client: fitserve.Client, settings: Settings, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    _train(client, digits, MODEL)
    x = digits[0][:1]
    with _inference_server(settings, max_queue_wait_ms=100.0) as running:
        with grpc.insecure_channel(running.target) as channel:
            sdk = fitserve.Client(channel=channel, timeout=WAIT)  # no retries: refusals show
            outcomes: list[str] = []

            def one(_: int) -> None:
                try:
                    outcomes.append(str(sdk.predict(MODEL, x).shape))
                except fitserve.FitserveError as exc:
                    outcomes.append(f"{exc.code}: {exc.details}")

            with ThreadPoolExecutor(CALLS) as pool:
                for _ in range(ROUNDS):  # the first round also loads the model
                    _freeze(running, FREEZE)
                    list(pool.map(one, range(CALLS)))
        queued = _metric(running, "fitserve_predict_rejections_total", reason="overloaded")

    assert outcomes == [str((1, 10))] * (CALLS * ROUNDS)
    assert queued == 0
