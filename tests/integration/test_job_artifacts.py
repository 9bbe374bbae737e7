"""A job's files (checkpoints, history.csv) listed and downloaded over the API, the SDK
and the CLI; bad paths refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2, training_pb2_grpc
from service.config import Settings
from tests.conftest import ROOT, RunningServer

pytestmark = pytest.mark.integration

FITSERVE = str(Path(sys.executable).parent / "fitserve")  # the installed CLI
LAYERS = [{"type": "Dense", "units": 3, "activation": "softmax", "input_shape": [4]}]


@pytest.fixture(scope="module")
def finished(server: RunningServer, worker: subprocess.Popen[bytes]) -> training_pb2.Job:
    rng = np.random.default_rng(2)
    x = rng.random((32, 4), dtype=np.float32)
    with fitserve.Client(server.target, timeout=120) as c:
        ds = c.upload_dataset("artifacts", x=x, y=x[:, :3].argmax(axis=1))
        return c.train(
            "artifacts",
            layers=LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=2,
            callbacks={"csv_logger": True, "model_checkpoint": {"monitor": "loss"}},
        ).wait(timeout=180)


def test_a_jobs_files_are_listed_and_downloaded(
    client: fitserve.Client, finished: training_pb2.Job, settings: Settings, tmp_path: Path
) -> None:
    listed = {a.path: a for a in client.list_artifacts(finished.id)}
    assert {"history.csv", "checkpoints/epoch-0001.keras", "checkpoints/epoch-0002.keras"} <= set(
        listed
    )
    assert not any(p.startswith("backup") for p in listed)
    on_disk = settings.jobs_dir / finished.id / "history.csv"
    assert listed["history.csv"].size_bytes == on_disk.stat().st_size

    assert client.download_artifact(finished.id, "history.csv") == on_disk.read_bytes()
    written = client.download_artifact(finished.id, "checkpoints/epoch-0002.keras", tmp_path)
    expected = (settings.jobs_dir / finished.id / "checkpoints" / "epoch-0002.keras").read_bytes()
    assert written == tmp_path / "epoch-0002.keras"
    assert Path(written).read_bytes() == expected


def test_the_cli_lists_and_downloads(
    server: RunningServer, finished: training_pb2.Job, tmp_path: Path
) -> None:
    def cli(*args: str) -> str:
        out = subprocess.run(
            [FITSERVE, "--target", server.target, "jobs", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    assert "history.csv" in cli("artifacts", finished.id)
    cli("download", finished.id, "history.csv", "-o", str(tmp_path / "h.csv"))
    assert (tmp_path / "h.csv").read_text().startswith("epoch,")


@pytest.mark.parametrize(
    ("job_id", "path", "code", "says"),
    [
        ("0" * 32, "history.csv", grpc.StatusCode.NOT_FOUND, "job"),
        (None, "../../models", grpc.StatusCode.INVALID_ARGUMENT, "without '..'"),
        (None, "/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "relative"),
        (None, "backup/chkpt.weights.h5", grpc.StatusCode.INVALID_ARGUMENT, "backup"),
        (None, "nope.txt", grpc.StatusCode.NOT_FOUND, "no artifact 'nope.txt'"),
        (None, "", grpc.StatusCode.INVALID_ARGUMENT, "path must be"),
    ],
    ids=["unknown-job", "dotdot", "absolute", "backup", "missing", "empty"],
)
def test_bad_downloads_are_refused(
    server: RunningServer,
    finished: training_pb2.Job,
    job_id: str | None,
    path: str,
    code: grpc.StatusCode,
    says: str,
) -> None:
    request = training_pb2.DownloadJobArtifactRequest(job_id=job_id or finished.id, path=path)
    with grpc.insecure_channel(server.target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.DownloadJobArtifact(request))
        assert info.value.code() is code
        assert says in str(info.value.details())
        listed = stub.ListJobArtifacts(training_pb2.ListJobArtifactsRequest(job_id=finished.id))
        assert listed.artifacts  # the server still serves


def test_listing_an_unknown_job_is_not_found(client: fitserve.Client) -> None:
    with pytest.raises(fitserve.NotFoundError):
        client.list_artifacts("0" * 32)
