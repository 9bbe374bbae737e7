"""A published version whose saved_model.pb is corrupt, asked for through the SDK (which
retries UNAVAILABLE and RESOURCE_EXHAUSTED): DATA_LOSS, not retried, naming the version
and what is wrong; the failure is remembered, so two calls cost one load, until its time
passes (tests/unit/service/inference/test_load_failures.py) or a new version of the
model is published (here).

Before: UNAVAILABLE, so every SDK attempt reloaded the version from disk (2 calls, 5 loads).
The server here is an inference-only one of this test's own (a short remembering period,
a store poll too slow to matter); the model is trained on the session's worker.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from fitserve.v1 import inference_pb2
from service.config import InferenceSettings, Settings
from tests.conftest import RunningServer, run_server, stop_server
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration
REMEMBER_SECONDS = 600.0  # longer than the test: only an event can end it
NAME = "corrupt-model"


@pytest.fixture
def inference(settings: Settings) -> Iterator[RunningServer]:
    custom = settings.model_copy(
        update={
            "roles": ["inference"],
            "inference": InferenceSettings(
                load_failure_seconds=REMEMBER_SECONDS, reload_poll_seconds=3600
            ),
        }
    )
    running, thread = run_server(custom)
    yield running
    stop_server(running, thread)


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _train(client: fitserve.Client, digits: tuple[np.ndarray, np.ndarray]) -> int:
    x, y = digits
    ds = client.upload_dataset(f"{NAME}-data", x=x[:64], y=y[:64])
    job = client.train(
        NAME, layers=MLP_LAYERS, loss="sparse_categorical_crossentropy", dataset=ds, epochs=1
    )
    return job.wait(timeout=120).model_version


def _loads(server: RunningServer, version: int, result: str) -> float:
    return _metric(
        server, "fitserve_model_loads_total", model=NAME, version=str(version), result=result
    )


def test_a_corrupt_version_answers_data_loss_loaded_once_and_not_retried(
    client: fitserve.Client,
    inference: RunningServer,
    settings: Settings,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    assert _train(client, digits) == 1
    pb = settings.models_dir / NAME / "1" / "saved_model.pb"
    pb.write_bytes(b"not a SavedModel \xff\xfe" * 64)
    x = digits[0][:2]

    with fitserve.Client(inference.target, timeout=30) as sdk:  # predict_attempts=3
        errors = []
        for _ in range(2):
            with pytest.raises(fitserve.DataLossError) as caught:
                sdk.predict(NAME, x)  # the default route: version 1
            errors.append(caught.value)
        status = sdk.model_status(NAME, 1).versions[0]

        assert _loads(inference, 1, "DATA_LOSS") == 1  # two calls, one load
        attempts = _metric(inference, "fitserve_predict_requests_total", model=NAME)
        assert attempts == 2  # DATA_LOSS is not retried by the SDK
        for _ in range(3):
            with pytest.raises(fitserve.DataLossError):
                sdk.predict(NAME, x, version=1)
        assert _loads(inference, 1, "DATA_LOSS") == 1  # still remembered
        message = errors[0].details
        assert message.startswith(f"model '{NAME}' version 1 cannot be loaded: its files are")
        assert f"<data folder>/models/{NAME}/1/saved_model.pb" in message
        assert "Wire format was corrupt" in message
        assert str(settings.data_dir.resolve()) not in message
        assert errors[1].details == message
        assert status.state == inference_pb2.ModelVersionStatus.STATE_FAILED
        assert status.error == message

        assert _train(client, digits) == 2  # its model event makes the server forget
        deadline = time.monotonic() + 60
        while _answering_version(sdk, x) != 2:  # the default route switched: event seen
            assert time.monotonic() < deadline, "the server did not switch to version 2"
            time.sleep(0.1)  # polling for the event's effect
        with pytest.raises(fitserve.DataLossError):
            sdk.predict(NAME, x, version=1)
        # The event made the server forget: the first request after it (a poll above, or
        # this one) loaded version 1 once more, and that failure is remembered again.
        assert _loads(inference, 1, "DATA_LOSS") == 2
        assert _loads(inference, 2, "OK") == 1


def _answering_version(sdk: fitserve.Client, x: np.ndarray) -> int:
    try:
        return sdk.predict_full(NAME, x).version
    except fitserve.DataLossError:
        return 1
