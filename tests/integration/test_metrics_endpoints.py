"""The /metrics endpoints of a real server and a real worker, scraped over HTTP and parsed
with prometheus_client's parser: every outcome counted (cancellations and deadlines as
gRPC reports them), failed calls timed, label sets there at zero before any event, a
version's series gone once it unloads, process and build metrics, the Redis probe, the
job statistics when Redis is away, the worker's training metrics and the queues."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import fitserve
from fitserve._tensors import to_tensor
from fitserve.v1 import (
    inference_pb2,
    tensor_pb2,
    training_pb2,
    training_pb2_grpc,
)
from service.config import Settings
from service.launch.ready import wait_ready
from service.launch.redis_server import start_redis
from service.launch.stack import Stack
from service.launch.supervision import terminate
from tests.conftest import RunningServer, run_server, stop_server, worker_ready_file
from tests.integration.conftest import MLP_LAYERS

MODEL = "metrics-mlp"
WAIT = 60.0  # a bound on polls for what a background task or thread does


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample with ``name`` whose labels include ``labels``."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)  # the polling period


def runtime_metrics_present(samples: list[Sample]) -> None:
    names = {s.name for s in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert {"process_open_fds", "process_start_time_seconds", "python_info"} <= names
    build = [s for s in samples if s.name == "fitserve_build_info"]
    assert [s.value for s in build] == [1.0]
    assert set(build[0].labels) == {"version", "python", "tensorflow", "keras"}
    assert build[0].labels["tensorflow"]
    assert build[0].labels["keras"]
    assert not [s.name for s in samples if s.name.endswith("_created")]


@pytest.fixture(scope="module")
def worker_port(worker: subprocess.Popen[bytes], settings: Settings) -> int:
    (ready,) = wait_ready([worker_ready_file(settings)], [("worker", worker)])
    return ready.port


@dataclass
class Trained:
    version: int
    before: list[Sample]  # the worker's /metrics before the job
    running: list[Sample]  # while the job ran
    after: list[Sample]  # once it ended


@pytest.fixture(scope="module")
def trained(
    server: RunningServer,
    worker: subprocess.Popen[bytes],
    worker_port: int,
    digits: tuple[np.ndarray, np.ndarray],
) -> Trained:
    """One small train job, the worker's /metrics scraped before, during and after it."""
    x, y = digits
    with fitserve.Client(server.target, timeout=120) as client:
        # a pool child reports once it has imported TensorFlow, seconds after the worker
        until(lambda: value(scrape(worker_port), "fitserve_gpu_devices") is not None, "warm")
        before = scrape(worker_port)
        ds = client.upload_dataset("metrics-digits", x=x[:64], y=y[:64])
        job = client.train(
            MODEL,
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            epochs=2,
            batch_size=32,
            callbacks={"plugins": [{"name": "faults>Hang", "seconds": 3}]},  # running a while
        )
        until(lambda: client.get_job(job.id).state == "RUNNING", "the job runs")
        running = scrape(worker_port)  # within the 3 s the fit hangs at its start
        result = job.wait(timeout=120)
        assert job.state == "SUCCEEDED"
        # the job's record ends just before its Celery task returns to the pool
        until(
            lambda: value(scrape(worker_port), "fitserve_worker_jobs_running") == 0.0,
            "the task returned",
        )
        return Trained(result.model_version, before, running, scrape(worker_port))


def test_worker_metrics_show_a_running_job_and_epoch_times(trained: Trained) -> None:
    before = trained.before
    runtime_metrics_present(before)
    pids = {s.labels["pid"] for s in before if s.name == "process_resident_memory_bytes"}
    assert len(pids) == 2  # the main process and its pool child
    assert value(before, "fitserve_worker_up", queue="train") == 1.0
    assert value(before, "fitserve_worker_up", queue="cpu") == 1.0
    assert value(before, "fitserve_gpu_devices") == 0.0  # a CPU machine: the clear absence
    assert not [s for s in before if s.name.startswith("fitserve_gpu_utilization")]
    assert value(before, "fitserve_redis_up") == 1.0
    epochs = value(before, "fitserve_training_epoch_duration_seconds_count", kind="train")
    # the session's worker may have fine-tuned before: the series is there (at zero from
    # the start) and a train does not move it
    tuned = value(before, "fitserve_training_epoch_duration_seconds_count", kind="fine_tune")
    assert tuned is not None
    assert epochs is not None
    steps = value(before, "fitserve_training_step_duration_seconds_count")
    assert steps is not None

    assert value(trained.running, "fitserve_worker_jobs_running") == 1.0

    after = trained.after
    count = value(after, "fitserve_training_epoch_duration_seconds_count", kind="train")
    assert value(after, "fitserve_training_epoch_duration_seconds_count", kind="fine_tune") == tuned
    assert count == epochs + 2
    assert (value(after, "fitserve_training_epoch_duration_seconds_sum", kind="train") or 0) > 0
    after_steps = value(after, "fitserve_training_step_duration_seconds_count") or 0
    assert after_steps - steps == 4  # 2 epochs of 2 batches
    assert (value(after, "fitserve_training_samples_per_second") or 0) > 0


def _predict(model: str, version: int, rows: int = 1, width: int = 28) -> bytes:
    x = np.zeros((rows, 28, width), np.float32)
    ref = tensor_pb2.ModelRef(name=model, version=version)
    return inference_pb2.PredictRequest(model=ref, inputs={"": to_tensor(x)}).SerializeToString()


def test_server_counts_every_outcome_and_forgets_an_unloaded_version(
    trained: Trained, client: fitserve.Client, server: RunningServer
) -> None:
    port = server.metrics_port
    first = scrape(port)
    runtime_metrics_present(first)
    # every method x code from the start, before anything happened
    for code in ("DEADLINE_EXCEEDED", "CANCELLED", "DATA_LOSS", "UNAUTHENTICATED"):
        assert value(first, "fitserve_rpc_requests_total", method="Predict", code=code) is not None
    assert value(first, "fitserve_rpc_requests_total", method="GetJob", code="INTERNAL") is not None
    assert value(first, "fitserve_model_load_failures_total", reason="DATA_LOSS") is not None
    # job statistics: every kind, outcome and failure reason
    assert value(first, "fitserve_job_metrics_up") == 1.0
    for kind in ("TRAIN", "EVALUATE", "FINE_TUNE"):
        assert (
            value(first, "fitserve_jobs_finished_total", kind=kind, outcome="CANCELLED") is not None
        )
        assert (
            value(first, "fitserve_jobs_failed_total", kind=kind, reason="WORKER_LOST") is not None
        )
        assert value(first, "fitserve_job_run_seconds_count", kind=kind) is not None
    assert (value(first, "fitserve_queue_workers", queue="train") or 0) >= 1

    version = trained.version
    labels = {"model": MODEL, "version": str(version)}
    outputs = client.predict(MODEL, np.zeros((2, 28, 28), np.float32), version=version)
    assert np.asarray(outputs).shape == (2, 10)
    loaded = scrape(port)
    for code in ("DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"):  # at zero
        got = value(
            loaded, "fitserve_predict_requests_total", **labels, method="Predict", code=code
        )
        assert got == 0.0
    assert value(loaded, "fitserve_predict_rejections_total", **labels, reason="queue_full") == 0
    assert value(loaded, "fitserve_feedback_rows_total", **labels) == 0.0  # its one output

    with grpc.insecure_channel(server.target) as channel:
        predict = channel.unary_unary(
            "/fitserve.v1.InferenceService/Predict",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        # a failed call is timed too, under its code
        with pytest.raises(grpc.RpcError) as bad:
            predict(_predict(MODEL, version, width=5), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # (deadlines and cancellations inside a handler: tests/unit/service/api/
        # test_status_wrappers.py and serving/test_predicting.py, over real gRPC; a call
        # that expires in gRPC's own queue never reaches fitserve: docs/metrics.md)

    now = scrape(port)
    by_version = {"model": MODEL, "version": str(version), "method": "Predict"}
    assert value(now, "fitserve_predict_requests_total", **by_version, code="INVALID_ARGUMENT") == 1
    bad_latency = {"model": MODEL, "version": str(version), "code": "INVALID_ARGUMENT"}
    assert value(now, "fitserve_predict_duration_seconds_count", **bad_latency) == 1
    rpc_bad = value(
        now, "fitserve_rpc_duration_seconds_count", method="Predict", code="INVALID_ARGUMENT"
    )
    assert (rpc_bad or 0) >= 1

    # the version unloads once deleted: every series of it goes
    client.delete_version(MODEL, version)

    def gone() -> bool:
        return not [s for s in scrape(port) if s.labels.get("model") == MODEL]

    until(gone, f"the series of {MODEL} version {version} removed")


@pytest.fixture
def workerless(tmp_path: Path) -> Iterator[tuple[Stack, Settings, RunningServer]]:
    """A Redis and an in-process server of their own, and no worker: jobs stay queued."""
    with Stack(tmp_path, server=None, worker=None) as stack:
        settings = Settings(
            data_dir=tmp_path / "data",
            redis_url=stack.redis_url,
            port=0,
            metrics_port=0,
            log_format="text",
            grace_seconds=1.0,
            roles=["api"],
            redis_probe_seconds=0.2,
        )
        running, thread = run_server(settings)
        try:
            yield stack, settings, running
        finally:
            stop_server(running, thread)


def test_queues_watch_outcomes_and_redis_health_without_a_worker(
    workerless: tuple[Stack, Settings, RunningServer], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    stack, _settings, running = workerless
    port = running.metrics_port
    assert value(scrape(port), "fitserve_queue_length", queue="train") == 0.0
    x, y = digits
    with fitserve.Client(running.target, timeout=60) as client:
        ds = client.upload_dataset("queued", x=x[:8], y=y[:8])
        job = client.train(
            "queued", layers=MLP_LAYERS, loss="sparse_categorical_crossentropy", dataset=ds
        )
    queued = scrape(port)
    assert value(queued, "fitserve_queue_length", queue="train") == 1.0
    assert value(queued, "fitserve_queue_workers", queue="train") == 0.0
    assert value(queued, "fitserve_queue_length", queue="cpu") == 0.0
    until(
        lambda: (value(scrape(port), "fitserve_job_oldest_queued_seconds", queue="train") or 0) > 0,
        "the queued job's wait shows",
    )

    with grpc.insecure_channel(running.target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        request = training_pb2.WatchJobRequest(job_id=job.id)
        # Each watch's first event shows its handler runs: a call whose deadline passes
        # before it reaches the server is never the server's to count.
        late_watch = stub.WatchJob(request, timeout=3.0)
        next(late_watch)
        with pytest.raises(grpc.RpcError) as late:
            list(late_watch)  # a queued job: nothing ends it but the deadline
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        watch = stub.WatchJob(request, timeout=60)
        next(watch)  # the watch is in its handler
        watch.cancel()

    def counted(code: str) -> float:
        samples = scrape(port)
        return value(samples, "fitserve_rpc_requests_total", method="WatchJob", code=code) or 0

    until(lambda: counted("DEADLINE_EXCEEDED") == 1, "the late watch counted")
    until(lambda: counted("CANCELLED") == 1, "the cancelled watch counted")
    timed = scrape(port)
    for code in ("DEADLINE_EXCEEDED", "CANCELLED"):
        assert (
            value(timed, "fitserve_rpc_duration_seconds_count", method="WatchJob", code=code) == 1
        )

    # Redis stopped: the probe says so and the job statistics report the error
    assert stack.redis is not None
    redis_port = stack.redis.port
    assert value(scrape(port), "fitserve_redis_up") == 1.0
    terminate([stack.redis.proc])
    until(lambda: value(scrape(port), "fitserve_redis_up") == 0.0, "redis_up 0")
    down = scrape(port)
    assert value(down, "fitserve_job_metrics_up") == 0.0
    assert not [s for s in down if s.name.startswith("fitserve_jobs_finished")]
    stack.redis = start_redis(stack.work / "redis", ports=(redis_port,))  # same port, same AOF
    until(lambda: value(scrape(port), "fitserve_redis_up") == 1.0, "redis_up 1 again")
    up = scrape(port)
    assert value(up, "fitserve_job_metrics_up") == 1.0
    assert (value(up, "fitserve_redis_ping_seconds_count") or 0) > 0
