"""Infrastructure faults against real processes: Redis restarted (3 s, then 10 s down)
mid-training, a worker's Celery main process SIGKILLed and the newest backup damaged, a
worker SIGTERMed mid-job, a job that cannot stop within the grace, a cancel whose worker
is gone, a worker SIGKILLed after receiving a job's message and before starting it. Each asserts the job's states and attempts, its event stream (every epoch, none
twice but the one redone after a damaged backup), every epoch once in its history, and
exactly one version on disk.

These run on a Redis, an in-process server and workers of their own (not the session's),
with short leases (``LEASE``, ``REAPER``) so recovery takes seconds. Epochs are paced by the
``pacing>Pace`` test plugin so faults land mid-fit. Each test prints what it measured
(``pytest -s``): docs/reliability.md quotes those numbers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import fitserve
from fitserve.v1 import training_pb2
from service.config import Settings
from service.domain.jobs import alive_key, history_key, job_key
from service.launch.redis_server import RedisServer, start_redis
from service.launch.supervision import terminate
from service.training.callbacks import METADATA_FILE
from tests.conftest import TEST_PLUGINS, run_server, start_worker, stop_process, stop_server

pytestmark = pytest.mark.integration
LEASE = 3.0  # s: FITSERVE_JOB_LEASE_SECONDS of the servers and workers here
REAPER = 1.0  # s: the reaper's period
GRACE = 10.0  # s: a SIGTERMed worker's bound
EPOCHS = 40
PACE = 0.06  # s per batch, 8 batches an epoch: about half a second an epoch
LAYERS = [
    {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [4]},
    {"type": "Dense", "units": 3, "activation": "softmax"},
]
RUNNING = training_pb2.JOB_STATE_RUNNING


@dataclass
class Cluster:
    """A Redis (restartable on its port, with its AOF), a server and workers of a test."""

    root: Path
    settings: Settings
    target: str
    redis: RedisServer
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def worker(
        self, name: str, grace: float = GRACE, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a worker and wait until it takes jobs; ``env`` adds FITSERVE_* settings."""
        env = {
            "FITSERVE_JOB_LEASE_SECONDS": str(LEASE),
            "FITSERVE_WORKER_STOP_GRACE_SECONDS": str(grace),
            **(env or {}),
        }
        proc = start_worker(self.settings, self.log(name), **env)
        self.workers[name] = proc
        _until(lambda: self.log(name).read_text(errors="replace").count(" ready") >= 2, 120)
        return proc

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def restart_redis(self, down: float) -> None:
        """Stop redis-server (it writes its AOF), wait ``down`` seconds, start it again on
        the same port with the same AOF and password."""
        port = self.redis.port
        terminate([self.redis.proc])
        time.sleep(down)
        self.redis = start_redis(self.root / "redis", ports=[port], attempts=0)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)


@contextmanager
def cluster(root: Path, **overrides: Any) -> Iterator[Cluster]:
    server = start_redis(root / "redis")
    settings = Settings(
        data_dir=root / "data",
        redis_url=server.url,
        port=0,
        metrics_port=0,
        log_format="text",
        grace_seconds=1.0,
        plugins=[*TEST_PLUGINS, "tests.plugins.pacing"],
        job_lease_seconds=LEASE,
        job_reaper_period_seconds=REAPER,
        worker_stop_grace_seconds=GRACE,
        **overrides,
    )
    running, thread = run_server(settings)
    c = Cluster(root, settings, running.target, server)
    try:
        yield c
    finally:
        for proc in c.workers.values():
            stop_process(proc)
        stop_server(running, thread)
        terminate([c.redis.proc])


def _until(condition: Callable[[], object], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def _train(client: fitserve.Client, name: str, epochs: int = EPOCHS) -> fitserve.Job:
    rng = np.random.default_rng(1)
    x = rng.random((1024, 4), dtype=np.float32)
    ds = client.upload_dataset(f"{name}-data", x=x, y=x[:, :3].argmax(axis=1))
    return client.train(
        name,
        layers=LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=epochs,
        batch_size=128,
        seed=0,
        callbacks={"plugins": [{"name": "pacing>Pace", "seconds": PACE}]},
    )


def _recorded(c: Cluster, job_id: str) -> int:
    """Epochs in the job's history, read from Redis (0 while Redis is away)."""
    try:
        with c.client() as r:
            return int(r.llen(history_key(job_id)))
    except redis.ConnectionError:
        return 0


def _field(c: Cluster, job_id: str, name: str) -> str:
    with c.client() as r:
        return str(r.hget(job_key(job_id), name) or "")


def _backups(c: Cluster, job_id: str) -> list[Path]:
    """The job's backups on disk, oldest first."""
    folder = c.settings.jobs_dir / job_id / "backup"
    found = [p for p in folder.iterdir() if p.name.startswith("gen-")] if folder.is_dir() else []
    return sorted(found, key=lambda p: (int(p.name.split("-")[1]), p.name))


def _runs(events: list[training_pb2.JobEvent]) -> list[tuple[int, int]]:
    """(attempt, epoch) of every epoch event, in stream order."""
    attempt, out = 0, []
    for event in events:
        if event.HasField("state_changed") and event.state_changed.state == RUNNING:
            attempt = event.state_changed.attempt
        if event.HasField("epoch_ended"):
            out.append((attempt, event.epoch_ended.epoch))
    return out


def _states(events: list[training_pb2.JobEvent]) -> list[tuple[str, int]]:
    return [
        (
            training_pb2.JobState.Name(e.state_changed.state).removeprefix("JOB_STATE_"),
            e.state_changed.attempt,
        )
        for e in events
        if e.HasField("state_changed")
    ]


def _running_since(events: list[training_pb2.JobEvent], attempt: int) -> float:
    """When attempt ``attempt`` started (the event's time)."""
    event = next(
        e
        for e in events
        if e.HasField("state_changed")
        and e.state_changed.state == RUNNING
        and e.state_changed.attempt == attempt
    )
    return float(event.time.seconds + event.time.nanos / 1e9)


def _one_version(c: Cluster, name: str, result: training_pb2.Job, epochs: int = EPOCHS) -> None:
    versions = [p.name for p in (c.settings.models_dir / name).iterdir() if p.name.isdigit()]
    assert versions == ["1"]
    assert result.model_version == 1
    assert [e.epoch for e in result.history] == list(range(1, epochs + 1))  # each epoch once


def _child_of(c: Cluster, job_id: str) -> int:
    """The pid of the worker child holding the job's lease (host/pid)."""
    host, _, pid = _field(c, job_id, "lease_owner").rpartition("/")
    assert host == socket.gethostname()
    return int(pid)


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _measured(what: str, value: float, unit: str = "s") -> None:
    print(f"\nMEASURED {what}: {round(value, 1):g} {unit}".rstrip())


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster and one worker for the Redis restarts (the worker outlives them)."""
    with cluster(tmp_path_factory.mktemp("redis-restart")) as c:
        c.worker("worker")
        yield c


def test_training_survives_redis_restarts_and_records_every_epoch_once(steady: Cluster) -> None:
    """Redis stopped for 3 s, then for 10 s, while one job trains."""
    c = steady
    epochs = 60
    with fitserve.Client(c.target, timeout=60) as client:
        job = _train(client, "blips", epochs)
        meanwhile, target = [], 3
        for down in (3.0, 10.0):
            _until(lambda t=target: _recorded(c, job.id) >= t, 120, f"epoch {target}")
            before = _recorded(c, job.id)
            lease = float(_field(c, job.id, "lease_until"))
            c.restart_redis(down)
            back = time.monotonic()
            meanwhile.append(int(_backups(c, job.id)[-1].name.split("-")[1]) - before)
            _until(lambda t=lease: float(_field(c, job.id, "lease_until")) > t, 30, "a new lease")
            renewed = time.monotonic() - back
            _measured(f"Redis down {down:g} s: Redis back until the lease was renewed", renewed)
            _measured(f"Redis down {down:g} s: epochs trained meanwhile", meanwhile[-1], "")
            target = before + meanwhile[-1] + 2
        result = job.wait(timeout=180)
        events = list(job.events())

    assert min(meanwhile) >= 1  # the fit went on while Redis was down
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.attempt == 1  # never killed, never requeued
    assert _states(events) == [("QUEUED", 0), ("RUNNING", 1), ("SUCCEEDED", 0)]
    assert [epoch for _attempt, epoch in _runs(events)] == list(range(1, epochs + 1))
    _one_version(c, "blips", result, epochs)
    assert "Connection to broker lost" in c.log("worker").read_text(errors="replace")


def test_cancelling_a_job_whose_worker_is_gone_ends_cancelled(steady: Cluster) -> None:
    """Last of the steady cluster's tests: it kills the worker."""
    c = steady
    worker = c.workers["worker"]
    with fitserve.Client(c.target, timeout=60) as client:
        job = _train(client, "orphan")
        _until(lambda: _recorded(c, job.id) >= 1, 120, "epoch 1")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
        started = time.monotonic()
        assert client.cancel_job(job.id).state == training_pb2.JOB_STATE_CANCELLING
        with pytest.raises(fitserve.JobCancelledError):
            job.wait(timeout=60)
        took = time.monotonic() - started
        final = job.refresh()
    _measured("cancel of a job whose worker is gone, until CANCELLED", took)
    assert took < LEASE + 2 * REAPER + 2
    assert final.state == training_pb2.JOB_STATE_CANCELLED
    assert final.attempt == 1


def test_a_job_that_cannot_stop_within_the_grace_is_killed_and_queued_again(
    steady: Cluster,
) -> None:
    """A job stuck where it cannot stop (a callback that does not return, never at a
    batch end): past the grace its child is killed and its lease ended, so the reaper
    queues it again at once. Runs after the steady worker was killed."""
    c, grace = steady, 2.0
    proc = c.worker("stubborn", grace=grace)
    rng = np.random.default_rng(2)
    x = rng.random((64, 4), dtype=np.float32)
    with fitserve.Client(c.target, timeout=60) as client:
        ds = client.upload_dataset("stuck-data", x=x, y=x[:, :3].argmax(axis=1))
        job = client.train(
            "stuck",
            layers=LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=ds,
            callbacks={"plugins": [{"name": "faults>Hang", "seconds": 120}]},
        )
        _until(lambda: _field(c, job.id, "state") == "RUNNING", 60, "RUNNING")
        time.sleep(1)  # inside the hanging callback
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace + 15)
        exited = time.monotonic() - stopped
        _until(lambda: _field(c, job.id, "state") == "QUEUED", LEASE + 3 * REAPER, "QUEUED")
        requeued = time.monotonic() - stopped
        record = client.job_record(job.id)
        assert client.cancel_job(job.id).state == training_pb2.JOB_STATE_CANCELLED
    log = c.log("stubborn").read_text(errors="replace")
    _measured(f"SIGTERM of a job that cannot stop (grace {grace:g} s) until the exit", exited)
    _measured("... until the job was queued again", requeued)
    assert exited < grace + 5
    assert "did not stop within the grace" in log
    assert record.attempt == 1  # the next start counts it as lost (it had to be killed)


def test_a_sigkilled_worker_s_job_resumes_on_another_from_its_last_good_backup(
    tmp_path: Path,
) -> None:
    """Only the Celery main process is killed (its pool child dies with it); the newest
    backup is then damaged, as a kill mid-write would have in earlier releases."""
    with cluster(tmp_path) as c:
        first = c.worker("worker-1")
        with fitserve.Client(c.target, timeout=60) as client:
            job = _train(client, "killed")
            _until(lambda: _recorded(c, job.id) >= 2, 120, "epoch 2")
            c.worker("worker-2")  # idle until the job comes back
            assert _recorded(c, job.id) < EPOCHS - 5, "the job ran out before the fault"
            child = _child_of(c, job.id)
            os.kill(first.pid, signal.SIGKILL)
            killed = time.time()
            _until(lambda: _dead(child), 10, "the pool child to die with its parent")
            newest = _backups(c, job.id)[-1]
            damaged = int(newest.name.split("-")[1])
            (newest / METADATA_FILE).write_text("")
            result = job.wait(timeout=180)
            events = list(job.events())

    resumed = _running_since(events, 2)
    _measured("SIGKILL of the Celery main process, until attempt 2 ran", resumed - killed)
    assert resumed - killed < LEASE + 2 * REAPER + 3
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.attempt == 2
    states = _states(events)
    assert states[:3] == [("QUEUED", 0), ("RUNNING", 1), ("QUEUED", 1)]
    assert states[3:] == [("RUNNING", 2), ("SUCCEEDED", 0)]
    runs = _runs(events)
    first_of_2 = next(epoch for attempt, epoch in runs if attempt == 2)
    assert first_of_2 == damaged  # from the backup before the damaged one, not epoch 1
    epochs = [epoch for _attempt, epoch in runs]
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1))  # no gap
    assert {e for e in epochs if epochs.count(e) > 1} <= {damaged}  # only the redone one
    _one_version(c, "killed", result)
    assert any("stopped renewing its lease" in e.log.message for e in events if e.HasField("log"))


def test_a_sigtermed_worker_hands_its_job_back_within_the_grace(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        first = c.worker("worker-1")
        with fitserve.Client(c.target, timeout=60) as client:
            job = _train(client, "handed")
            _until(lambda: _recorded(c, job.id) >= 2, 120, "epoch 2")
            c.worker("worker-2")
            assert _recorded(c, job.id) < EPOCHS - 5, "the job ran out before the fault"
            stopped = time.monotonic()
            sent = time.time()
            first.send_signal(signal.SIGTERM)  # the main process only, as Kubernetes does
            first.wait(GRACE + 10)
            exited = time.monotonic() - stopped
            result = job.wait(timeout=180)
            events = list(job.events())
            handbacks = _field(c, job.id, "handbacks")
        log = c.log("worker-1").read_text(errors="replace")

    _measured("SIGTERM until the worker exited", exited)
    _measured("SIGTERM until attempt 2 ran on the other worker", _running_since(events, 2) - sent)
    assert exited < GRACE
    assert first.returncode == 0
    assert "job handed back: queued" in log
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.attempt == 2
    assert handbacks == "1"
    assert _states(events) == [
        ("QUEUED", 0),
        ("RUNNING", 1),
        ("QUEUED", 1),
        ("RUNNING", 2),
        ("SUCCEEDED", 0),
    ]
    runs = _runs(events)
    last_of_1 = max(epoch for attempt, epoch in runs if attempt == 1)
    assert next(epoch for attempt, epoch in runs if attempt == 2) == last_of_1 + 1
    assert [epoch for _attempt, epoch in runs] == list(range(1, EPOCHS + 1))  # no gap, no repeat
    _one_version(c, "handed", result)


HEARTBEAT = 1.0  # s: FITSERVE_WORKER_HEARTBEAT_SECONDS of the stranded-job test
TTL = 3.0  # s: FITSERVE_WORKER_HEARTBEAT_TTL_SECONDS, the grace of a received job


def test_a_job_whose_worker_died_before_starting_it_is_sent_again_and_runs_once(
    tmp_path: Path,
) -> None:
    """The gap the soak found: the worker's main process received the job's message and
    was SIGKILLed before its pool child started the job (held there by a test hook). The
    job is sent again once that worker's heartbeat is gone, runs once on another worker
    (whose /metrics port is taken: it heartbeats all the same), and the old message,
    redelivered as the visibility timeout would, is dropped and acknowledged."""
    from kombu import Connection

    from worker.received import PAUSE_ENV

    beat = {
        "FITSERVE_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT),
        "FITSERVE_WORKER_HEARTBEAT_TTL_SECONDS": str(TTL),
    }
    ttl = {"worker_heartbeat_seconds": HEARTBEAT, "worker_heartbeat_ttl_seconds": TTL}
    epochs = 4
    with cluster(tmp_path, **ttl) as c, fitserve.Client(c.target, timeout=60) as client:
        first = c.worker("worker-1", env=beat | {PAUSE_ENV: "600"})
        job = _train(client, "stranded", epochs)
        _until(lambda: _field(c, job.id, "received_by"), 60, "the job marked received")
        process = _field(c, job.id, "received_by")
        with c.client() as r:
            assert r.exists(alive_key(process))
        time.sleep(2 * TTL + 2 * REAPER)  # the worker lives (held): nothing is sent again
        assert _field(c, job.id, "state") == "QUEUED"
        assert _field(c, job.id, "received_by") == process
        with c.client() as r:
            assert r.hlen("unacked") == 1  # the message is the held worker's
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        killed = time.time()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            c.worker("worker-2", env=beat | {"FITSERVE_WORKER_METRICS_PORT": str(port)})
            result = job.wait(timeout=180)
        events = list(job.events())
        resent = [e for e in events if e.HasField("log") and "requeued: worker" in e.log.message]
        log2 = c.log("worker-2").read_text(errors="replace")
        with c.client() as r:
            alive2 = [k for k in r.scan_iter(alive_key("*")) if k != alive_key(process)]
            # the killed worker's message only: the second one is acknowledged as it ends
            _until(lambda: r.hlen("unacked") == 1, 30, "the second message acknowledged")

        # The visibility timeout's redelivery, now: kombu restores the unacked message.
        with Connection(c.settings.redis_url, transport_options={"visibility_timeout": 0}) as conn:
            conn.default_channel.qos.restore_visible(num=100)  # type: ignore[attr-defined]
        _until(lambda: "finished already" in c.log("worker-2").read_text(errors="replace"), 60)
        with c.client() as r:
            _until(lambda: r.hlen("unacked") == 0 and r.llen("train") == 0, 30, "the ack")
        final = job.refresh()

    assert len(resent) == 1
    sent_at = float(resent[0].time.seconds + resent[0].time.nanos / 1e9)
    _measured("SIGKILL after receiving, until the job was sent again", sent_at - killed)
    _measured("... until it ran on another worker", _running_since(events, 1) - killed)
    assert sent_at - killed < TTL + 2.4 * REAPER + 2  # the key expires, then a pass
    assert process in resent[0].log.message
    assert result.state == training_pb2.JOB_STATE_SUCCEEDED
    assert result.attempt == 1  # sent again, not counted as an attempt
    assert _states(events) == [("QUEUED", 0), ("RUNNING", 1), ("SUCCEEDED", 0)]
    assert [epoch for _attempt, epoch in _runs(events)] == list(range(1, epochs + 1))
    _one_version(c, "stranded", result, epochs)
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED
    assert len(list(final.history)) == epochs
    assert "cannot bind" in log2
    assert "its heartbeat goes on" in log2
    assert alive2, "the worker whose /metrics port was taken has no alive key"
