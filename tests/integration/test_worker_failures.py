"""How a job that fails on the worker reports it: a user error keeps its reason and its
message, anything unexpected is INTERNAL with a generic message and an error id that
finds the traceback in the worker's log; no message holds the data folder, a source path
or a traceback line.

This runs on its own Redis, server and worker (not the session's), so the test reads the
worker's log.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from tests.conftest import private_stack, start_worker, stop_process

pytestmark = pytest.mark.integration
LAYERS = [
    {"type": "Dense", "units": 4, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 2, "activation": "softmax"},
]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, fitserve.Client, Path]]:
    """Redis, server and one worker of our own: settings, a client and the worker's log."""
    root = tmp_path_factory.mktemp("worker-failures")
    with private_stack(root) as (settings, running):
        log = root / "worker.log"
        worker: subprocess.Popen[bytes] = start_worker(settings, log)
        try:
            with fitserve.Client(running.target, timeout=120) as client:
                yield settings, client, log
        finally:
            stop_process(worker)


def _upload(client: fitserve.Client, name: str) -> str:
    rng = np.random.default_rng(0)
    x = rng.random((32, 4), dtype=np.float32)
    return client.upload_dataset(name, x=x, y=(x[:, 0] > 0.5).astype(np.int64)).id


def _failed(client: fitserve.Client, dataset: str) -> training_pb2.Job:
    job = client.train(
        "fails", layers=LAYERS, loss="sparse_categorical_crossentropy", dataset=dataset
    )
    with pytest.raises(fitserve.JobFailedError) as exc:
        job.wait(timeout=180)
    return exc.value.job


def _leaks(message: str, settings: Settings) -> list[str]:
    folders = {str(settings.data_dir), str(settings.data_dir.resolve())}
    found = [f for f in folders if f in message]
    found += re.findall(r"\S+\.py\b", message)
    found += re.findall(r'File ".*", line \d+|Traceback \(most recent call last\)', message)
    return found


def test_an_unexpected_failure_is_internal_with_an_error_id_in_the_log(
    stack: tuple[Settings, fitserve.Client, Path],
) -> None:
    settings, client, log = stack
    dataset = _upload(client, "blob-gone")
    # The store's record stays, its content goes: the worker's np.load fails with an
    # error naming the blob's path in the data folder, a server fault, not the caller's.
    (settings.datasets_dir / "blobs" / f"{dataset.removeprefix('sha256:')}.npz").unlink()

    job = _failed(client, dataset)

    assert job.error.reason == "INTERNAL"
    match = re.fullmatch(
        r"the job failed with an internal error on the worker; quote error id "
        r"([0-9a-f]{16}) when reporting it \(the worker's log has the details\)",
        job.error.message,
    )
    assert match, job.error.message
    assert _leaks(job.error.message, settings) == []
    error_id = match.group(1)
    logged = log.read_text(errors="replace")
    line = next(li for li in logged.splitlines() if error_id in li)
    assert "job crashed" in line
    assert "FileNotFoundError" in logged[logged.index(line) :]  # the traceback follows it
    assert client.list_models() is not None  # the server still serves


def test_a_user_error_keeps_its_reason_and_a_message_without_the_data_folder(
    stack: tuple[Settings, fitserve.Client, Path],
) -> None:
    settings, client, _ = stack
    # A cached built-in dataset that is not the published file: the job fails saying
    # where the file is, so that the operator replaces it, with the data folder named
    # rather than spelled out.
    cached = settings.data_dir / "keras_datasets" / "datasets" / "boston_housing.npz"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the published file")

    job = _failed(client, "builtin:boston_housing")

    assert job.error.reason == "DATASET_UNAVAILABLE"
    assert "<data folder>/keras_datasets/datasets/boston_housing.npz has the wrong sha256" in (
        job.error.message
    )
    assert _leaks(job.error.message, settings) == []
