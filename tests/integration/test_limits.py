"""Message size limits: the server's refusal names its limit and FITSERVE_MAX_MESSAGE_BYTES,
the SDK refuses before sending, and the server keeps serving after a refusal."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fitserve
from bench.models import MODEL, publish_reference
from service.config import Settings
from tests.conftest import RunningServer, run_server, stop_server

pytestmark = pytest.mark.integration
LIMIT = 4 * 1024 * 1024
ROWS_5_MIB = 5 * 1024 * 1024 // (28 * 28 * 4) + 1  # float32 28x28 images


@pytest.fixture(scope="module")
def small_limit(settings: Settings) -> Iterator[RunningServer]:
    """A server whose message limit is 4 MiB, with the reference model published."""
    publish_reference(settings.models_dir, versions=1)
    running, thread = run_server(settings.model_copy(update={"max_message_bytes": LIMIT}))
    yield running
    stop_server(running, thread)


def _images(rows: int) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 28, 28), dtype=np.float32)


def _count(server: RunningServer, method: str, code: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == "fitserve_rpc_requests_total" and s.labels == {"method": method, "code": code}
    )


def test_an_oversize_predict_is_refused_naming_the_setting_and_the_server_keeps_serving(
    small_limit: RunningServer,
) -> None:
    with fitserve.Client(small_limit.target, timeout=60) as client:
        with pytest.raises(fitserve.ResourceExhaustedError) as refused:
            client.predict(MODEL, _images(ROWS_5_MIB))
        assert client.predict(MODEL, _images(2)).shape == (2, 10)

    message = refused.value.details
    assert f"over this server's limit of {LIMIT} bytes" in message
    assert "FITSERVE_MAX_MESSAGE_BYTES" in message
    assert _count(small_limit, "Predict", "RESOURCE_EXHAUSTED") == 1


def test_an_oversize_upload_chunk_is_refused_naming_the_setting(
    small_limit: RunningServer,
) -> None:
    x = _images(ROWS_5_MIB)
    with fitserve.Client(small_limit.target, timeout=60) as client:
        with pytest.raises(fitserve.ResourceExhaustedError, match="FITSERVE_MAX_MESSAGE_BYTES"):
            client.upload_dataset("too-big-chunks", x=x, y=np.zeros(len(x)), chunk_bytes=5 << 20)
        assert client.upload_dataset("small-chunks", x=x[:4], y=np.zeros(4)).id


def test_the_sdk_refuses_an_oversize_request_before_sending_it(
    small_limit: RunningServer,
) -> None:
    before = _count(small_limit, "Predict", "RESOURCE_EXHAUSTED")
    with fitserve.Client(small_limit.target, max_message_bytes=LIMIT) as client:
        with pytest.raises(fitserve.ResourceExhaustedError) as refused:
            client.predict(MODEL, _images(ROWS_5_MIB))
        with pytest.raises(fitserve.ResourceExhaustedError, match="max_message_bytes"):
            client.upload_dataset("chunks", x=_images(1), y=np.zeros(1), chunk_bytes=LIMIT)

    assert f"over this client's max_message_bytes of {LIMIT}" in refused.value.details
    assert _count(small_limit, "Predict", "RESOURCE_EXHAUSTED") == before  # never sent
