"""Training benchmarks: a job through fitserve against the plain script, same run."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import procs
from bench.data import digits
from service.launch.stack import ServerPart, Stack, WorkerPart

LAYERS = [
    {"type": "Flatten", "input_shape": [28, 28]},
    {"type": "Dense", "units": 128, "activation": "relu"},
    {"type": "Dropout", "rate": 0.2},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]


def run(quick: bool) -> dict[str, Any]:
    """Fit throughput, start latency, whole-job overhead, accuracy and worker RSS growth."""
    samples, epochs, jobs = (4096, 3, 5) if quick else (16384, 5, 20)
    with tempfile.TemporaryDirectory(prefix="fitserve-bench-train-") as tmp:
        work = Path(tmp)
        x, y = digits(samples)
        np.savez(work / "digits.npz", x=x, y=y)
        plain = _plain(work / "digits.npz", epochs)
        with _stack(work) as stack:
            service = _through_fitserve(stack, x, y, epochs)
            rss = _rss_growth(stack, x[:256], y[:256], jobs)
    return {
        "samples": samples,
        "epochs": epochs,
        "batch_size": 32,
        "plain": plain,
        "fitserve": service,
        "rss": rss,
    }


def _plain(data: Path, epochs: int) -> dict[str, Any]:
    argv = procs.python("bench.plain_train", "--data", str(data), "--epochs", str(epochs))
    out = subprocess.run(
        argv,
        cwd=procs.ROOT,
        env=procs.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _stack(work: Path) -> Stack:
    """Redis, a server (api role) and a worker, started for this benchmark only."""
    return Stack(
        work,
        server=ServerPart(args=("--roles", "api")),
        worker=WorkerPart(loglevel="WARNING"),
        env=procs.env(FITSERVE_LOG_LEVEL="WARNING"),
        cwd=procs.ROOT,
    )


def _worker_child(stack: Stack) -> psutil.Process:
    """The prefork child that runs the jobs."""
    assert stack.worker is not None
    return psutil.Process(stack.worker.pid).children()[0]


def train_reference(client: Any, ds: Any, epochs: int, name: str, **fit: Any) -> Any:
    """Submit the reference MLP job (the plain script's model, compile and fit)."""
    return client.train(
        name,
        layers=LAYERS,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        dataset=ds,
        epochs=epochs,
        batch_size=32,
        seed=0,
        **fit,
    )


def _train(client: Any, ds: Any, epochs: int, name: str) -> tuple[Any, float, float]:
    called = time.time()
    job = train_reference(client, ds, epochs, name)
    returned = time.time()
    return job, called, returned


def _through_fitserve(stack: Stack, x: np.ndarray, y: np.ndarray, epochs: int) -> dict[str, Any]:
    import fitserve

    with fitserve.Client(stack.target, timeout=1800) as client:
        warm = client.upload_dataset("warm", x=x[:64], y=y[:64])
        _train(client, warm, 1, "warm-up")[0].wait()  # an idle, warm worker
        ds = client.upload_dataset("digits", x=x, y=y)
        job, called, returned = _train(client, ds, epochs, "ref-mlp")
        events = list(job.events())
        final = job.wait()
    epoch_ends = [e.time.ToNanoseconds() / 1e9 for e in events if e.HasField("epoch_ended")]
    done = next(
        e.time.ToNanoseconds() / 1e9
        for e in events
        if e.HasField("state_changed") and e.state_changed.state == final.state
    )
    return {
        "called": called,
        "returned": returned,
        "epoch_ends": epoch_ends,
        "done": done,
        "accuracy": final.metrics["accuracy"],
        "state": fitserve.v1.training_pb2.JobState.Name(final.state),
    }


def _rss_growth(stack: Stack, x: np.ndarray, y: np.ndarray, jobs: int) -> dict[str, Any]:
    import fitserve

    with fitserve.Client(stack.target, timeout=600) as client:
        ds = client.upload_dataset("rss", x=x, y=y)
        samples = []
        for i in range(jobs):
            _train(client, ds, 1, f"rss-{i}")[0].wait()
            samples.append(_worker_child(stack).memory_info().rss / 2**20)
    return {"jobs": jobs, "rss_mb": samples}
