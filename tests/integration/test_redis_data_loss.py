"""Redis loses all its data (FLUSHALL) while one job trains and another waits in the queue,
against real processes: a redis-server of this module's, an in-process gRPC server with
its reaper, a Celery worker process (one child, so the second job waits).

What must hold afterwards (docs/reliability.md, "Redis loses its data"):

- the running job's worker rebuilds its record (RUNNING, same attempt), finishes and
  publishes exactly one version; its event stream says the record was rebuilt;
- the queued job, whose Celery message was lost with its record, is recreated FAILED with
  reason RECORD_LOST after the reaper's grace, and never runs (no version);
- folders with no record (a job folder, a model's staging folder) are removed after the
  grace; the running job's folder is kept, and the lost job's record file and backups go;
- the server goes on serving: Predict on a model published before the flush, a new job.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import fitserve
from fitserve.v1 import training_pb2
from service.domain import job_records
from tests.integration.test_lease_faults import (
    LAYERS,
    LEASE,
    REAPER,
    Cluster,
    _recorded,
    _train,
    _until,
    cluster,
)

pytestmark = pytest.mark.integration
GRACE = 2 * (LEASE + REAPER)  # the reaper's default orphan grace with these settings
SUCCEEDED = training_pb2.JOB_STATE_SUCCEEDED
FAILED = training_pb2.JOB_STATE_FAILED


def _record(client: fitserve.Client, job_id: str) -> training_pb2.Job | None:
    """The job's record, or None while the server answers NOT_FOUND."""
    try:
        return client.job_record(job_id)
    except fitserve.NotFoundError:
        return None


def _versions(c: Cluster, name: str) -> list[str]:
    folder = c.settings.models_dir / name
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _small(client: fitserve.Client, name: str, epochs: int = 2) -> fitserve.Job:
    rng = np.random.default_rng(2)
    x = rng.random((64, 4), dtype=np.float32)
    ds = client.upload_dataset(f"{name}-data", x=x, y=x[:, :3].argmax(axis=1))
    return client.train(
        name,
        layers=LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=ds,
        epochs=epochs,
        batch_size=32,
        seed=0,
    )


def test_flushall_running_job_recovers_queued_job_fails_record_lost_orphans_removed(
    tmp_path: Path,
) -> None:
    with cluster(tmp_path) as c, fitserve.Client(c.target, timeout=60) as client:
        c.worker("worker")
        served = _small(client, "served").wait(timeout=180)
        assert served.state == SUCCEEDED
        x = np.random.default_rng(3).random((2, 4), dtype=np.float32)
        before = client.predict("served", x)

        running = _train(client, "survivor", epochs=30)
        queued = _small(client, "lost-in-queue")
        _until(lambda: _recorded(c, running.id) >= 3, 180, "epoch 3 of the running job")
        assert job_records.read(c.settings.jobs_dir, queued.id) is not None  # written at submit
        on_disk = job_records.read(c.settings.jobs_dir, running.id)
        assert on_disk is not None
        assert on_disk.attempt == 1  # rewritten by the worker
        # Leftovers the reaper must remove: a staging folder and a job folder of no job.
        stale_staging = c.settings.models_dir / "served" / ".staging" / uuid.uuid4().hex
        stale_staging.mkdir(parents=True)
        (stale_staging / "saved_model.pb").write_bytes(b"half")
        stale_job = c.settings.jobs_dir / uuid.uuid4().hex
        (stale_job / "backup").mkdir(parents=True)
        (stale_job / "history.csv").write_text("epoch,loss\n")

        with c.client() as r:
            assert r.flushall()
        flushed_at = time.monotonic()

        # The running job's worker rebuilds its record at its next lease renewal.
        _until(lambda: _record(client, running.id) is not None, 30, "the rebuilt record")
        rebuilt = time.monotonic() - flushed_at
        assert _record(client, running.id).state == training_pb2.JOB_STATE_RUNNING  # type: ignore[union-attr]
        result = running.wait(timeout=240)
        assert result.state == SUCCEEDED, result.error
        assert result.attempt == 1  # not requeued, not run twice
        assert result.model_version == 1
        assert _versions(c, "survivor") == ["1"]
        epochs = [e.epoch for e in result.history]
        assert epochs == list(range(epochs[0], 31))  # the epochs recorded since the rebuild
        logs = [
            e.log.message for e in client.watch_job(running.id, timeout=30) if e.HasField("log")
        ]
        assert any("record was lost" in m and "rebuilt it" in m for m in logs), logs
        gone = job_records.path(c.settings.jobs_dir, running.id)
        _until(lambda: not gone.exists(), 30, "the finished job's job.json removed")

        # The queued job: FAILED RECORD_LOST after the grace, never run.
        _until(lambda: _record(client, queued.id) is not None, 60 + GRACE, "RECORD_LOST")
        marked = time.monotonic() - flushed_at
        lost = client.job_record(queued.id)
        assert lost.state == FAILED
        assert lost.error.reason == "RECORD_LOST"
        assert "submit it again" in lost.error.message
        assert lost.model_name == "lost-in-queue"
        assert json.loads(lost.request_json)["fit"]["epochs"] == 2  # rebuilt from its job.json
        assert _versions(c, "lost-in-queue") == []
        assert not job_records.path(c.settings.jobs_dir, queued.id).exists()

        # The leftovers are gone; the survivor's folder was never taken for one.
        _until(lambda: not stale_staging.exists() and not stale_job.exists(), 30, "cleanup")
        assert (c.settings.models_dir / "served" / "1").is_dir()

        # Still serving: the old model, and a new job end to end.
        np.testing.assert_allclose(client.predict("served", x), before, rtol=1e-5)
        fresh = _small(client, "after-flush").wait(timeout=180)
        assert fresh.state == SUCCEEDED
        assert fresh.model_version == 1
        with pytest.raises(fitserve.NotFoundError):
            client.job_record(uuid.uuid4().hex)

        # No orphan left: every job folder and staging folder belongs to a job on record.
        def orphans() -> list[str]:
            folders = [*c.settings.jobs_dir.iterdir(), *c.settings.models_dir.glob("*/.staging/*")]
            return [p.name for p in folders if _record(client, p.name) is None]

        _until(lambda: not orphans(), 30, "no orphan folder")
        print(f"\nMEASURED FLUSHALL: running job's record rebuilt after {rebuilt:.1f} s")
        print(f"MEASURED FLUSHALL: queued job FAILED RECORD_LOST after {marked:.1f} s")
