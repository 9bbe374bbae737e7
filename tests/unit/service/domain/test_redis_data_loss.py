"""Redis losing its data (FLUSHDB on a database of this module's own, on the session's real
Redis): the worker rebuilding the record of the job it runs, the reaper recreating lost
jobs FAILED RECORD_LOST and removing folders with no record, the record file itself, and
the admin token of ``fitserve up`` registered again."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from service.domain import job_records
from service.domain.job_store import RECORD_LOST, AsyncJobStore, JobStore
from service.domain.jobs import INDEX, Job, JobKind, JobState, events_key, job_key
from service.domain.reaper import Reaper
from service.domain.tokens import ENABLED_KEY, TokenStore

DB = 7


def _job(**fields: object) -> Job:
    request = {"fit": {"epochs": 3}}
    return Job(uuid.uuid4().hex, JobKind.TRAIN, "m", "train", request, **fields)  # type: ignore[arg-type]


def _create(url: str, job: Job) -> None:
    async def go() -> None:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            await AsyncJobStore(client).create(job)
        finally:
            await client.aclose()

    asyncio.run(go())


def _log_messages(r: redis.Redis, job_id: str) -> list[str]:
    entries = r.xrange(events_key(job_id))
    return [
        json.loads(f["data"])["message"]
        for _, f in entries  # type: ignore[union-attr]
        if f["type"] == "log"
    ]


def test_the_worker_running_a_job_rebuilds_its_lost_record_and_finishes_it_once(
    url: str, r: redis.Redis
) -> None:
    job = _job(labels={"team": "a"})
    _create(url, job)
    store = JobStore(r, retention_seconds=60)
    started = store.start(job.id, 3, owner="host/1", lease_seconds=30)
    assert started is not None
    assert started.attempt == 1
    r.flushdb()

    assert store.heartbeat(job.id, 1, "host/1", 30) is JobState.RUNNING
    rebuilt = store.get(job.id)
    assert (rebuilt.state, rebuilt.attempt, rebuilt.lease_owner) == (JobState.RUNNING, 1, "host/1")
    assert rebuilt.labels == {"team": "a"}
    assert rebuilt.request == job.request
    assert r.zscore(INDEX, job.id) is not None  # ListJobs finds it again
    assert any("rebuilt it" in m for m in _log_messages(r, job.id))
    assert store.record_epoch(job.id, 2, 3, {"loss": 0.5})
    assert store.succeed(job.id, {"loss": 0.4}, 1)
    assert store.get(job.id).state is JobState.SUCCEEDED
    assert not store.succeed(job.id, {"loss": 0.4}, 1)  # finished once
    assert 0 < int(r.ttl(job_key(job.id))) <= 60  # a finished record expires as usual


def test_a_lost_record_is_rebuilt_by_whichever_call_finds_it_gone_first(
    url: str, r: redis.Redis
) -> None:
    for call in ("epoch", "state", "fail"):
        job = _job()
        _create(url, job)
        store = JobStore(r)
        assert store.start(job.id, 3, owner="host/2") is not None
        r.delete(job_key(job.id))
        if call == "epoch":
            assert store.record_epoch(job.id, 1, 3, {"loss": 1.0})
            assert [e["epoch"] for e in store.get(job.id).history] == [1]
        elif call == "state":
            assert store.state(job.id) is JobState.RUNNING
        else:
            assert store.fail(job.id, "INTERNAL", "boom")
            assert store.get(job.id).state is JobState.FAILED


def test_a_worker_that_did_not_start_the_job_rebuilds_nothing(url: str, r: redis.Redis) -> None:
    job = _job()
    _create(url, job)
    JobStore(r).start(job.id, 3, owner="host/3")
    r.flushdb()
    other = JobStore(r)
    assert other.heartbeat(job.id, 1, "host/3", 30) is None
    assert not r.exists(job_key(job.id))


def test_a_record_is_rebuilt_only_when_none_exists(url: str, r: redis.Redis) -> None:
    """The worker's rebuild never overwrites a record: another attempt's, or RECORD_LOST."""
    job = _job()
    _create(url, job)
    store = JobStore(r)
    assert store.start(job.id, 3, owner="host/4") is not None
    r.flushdb()
    lost = _job()
    lost.id = job.id

    async def mark() -> bool:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await AsyncJobStore(client).mark_lost(lost)
        finally:
            await client.aclose()

    assert asyncio.run(mark())
    assert store.heartbeat(job.id, 1, "host/4", 30) is None  # not this attempt's: it stops
    assert store.get(job.id).state is JobState.FAILED
    assert store.get(job.id).error_reason == RECORD_LOST
    assert not asyncio.run(mark())  # exists now: nothing done


def _reaper(url: str, jobs_dir: Path, models_dir: Path, grace: float) -> tuple[Reaper, Any]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    store = AsyncJobStore(client, retention_seconds=3600)
    reaper = Reaper(
        store,
        lambda *_: None,
        lease_seconds=30,
        period_seconds=10,
        max_attempts=3,
        jobs_dir=jobs_dir,
        models_dir=models_dir,
        orphan_grace_seconds=grace,
    )
    return reaper, client


def _sweep(url: str, jobs_dir: Path, models_dir: Path, grace: float, passes: int = 1) -> list:
    async def go() -> list:
        reaper, client = _reaper(url, jobs_dir, models_dir, grace)
        try:
            done = []
            for _ in range(passes):
                done += await reaper.sweep_orphans()
            return done
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_the_reaper_marks_lost_jobs_record_lost_and_removes_folders_of_no_job(
    url: str, r: redis.Redis, tmp_path: Path
) -> None:
    jobs_dir, models_dir = tmp_path / "jobs", tmp_path / "models"
    queued = _job(created_at=123.0)
    job_records.write(jobs_dir, queued)
    (jobs_dir / queued.id / "backup").mkdir()
    (jobs_dir / queued.id / "history.csv").write_text("epoch\n")
    finished_id = uuid.uuid4().hex
    (jobs_dir / finished_id).mkdir()
    (jobs_dir / finished_id / "history.csv").write_text("epoch\n")
    corrupt_id = uuid.uuid4().hex
    (jobs_dir / corrupt_id).mkdir()
    job_records.path(jobs_dir, corrupt_id).write_text("{not json")
    live = _job()
    _create(url, live)
    job_records.write(jobs_dir, live)
    staging = models_dir / "m" / ".staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    live_staging = models_dir / "m" / ".staging" / live.id
    live_staging.mkdir()
    not_a_job = jobs_dir / "notes"
    not_a_job.mkdir()

    assert _sweep(url, jobs_dir, models_dir, grace=3600) == []  # within the grace: nothing
    assert (jobs_dir / finished_id).exists()

    done = {o.job_id: o.outcome for o in _sweep(url, jobs_dir, models_dir, grace=0)}
    assert done == {
        queued.id: "record_lost",
        finished_id: "removed",
        corrupt_id: "removed",
        staging.name: "removed",
    }
    record = r.hgetall(job_key(queued.id))
    assert record["state"] == "FAILED"
    assert record["error_reason"] == RECORD_LOST
    assert json.loads(record["request"]) == queued.request
    assert float(record["created_at"]) == 123.0
    assert 0 < int(r.ttl(job_key(queued.id))) <= 3600
    assert r.zscore(INDEX, queued.id) == 123.0
    assert sorted(p.name for p in (jobs_dir / queued.id).iterdir()) == ["history.csv"]
    assert not (jobs_dir / finished_id).exists()
    assert not (jobs_dir / corrupt_id).exists()
    assert not staging.exists()
    assert live_staging.exists()  # its job is queued: an export may come
    assert job_records.read(jobs_dir, live.id) is not None
    assert not_a_job.exists()


def test_the_reaper_removes_the_record_file_of_a_finished_job(
    url: str, r: redis.Redis, tmp_path: Path
) -> None:
    jobs_dir = tmp_path / "jobs"
    job = _job()
    _create(url, job)
    job_records.write(jobs_dir, job)
    (jobs_dir / job.id / "history.csv").write_text("epoch\n")
    r.hset(job_key(job.id), "state", "SUCCEEDED")
    assert _sweep(url, jobs_dir, tmp_path / "models", grace=0) == []
    assert not job_records.path(jobs_dir, job.id).exists()
    assert (jobs_dir / job.id / "history.csv").exists()


def test_record_files_round_trip_and_unreadable_ones_read_as_none(tmp_path: Path) -> None:
    job = _job(labels={"a": "b"}, owner="ops", created_at=5.0, attempt=2)
    job_records.write(tmp_path, job)
    back = job_records.read(tmp_path, job.id)
    assert back is not None
    assert (back.kind, back.model_name, back.queue, back.request) == (
        job.kind,
        job.model_name,
        job.queue,
        job.request,
    )
    assert (back.labels, back.owner, back.created_at, back.attempt) == ({"a": "b"}, "ops", 5.0, 2)
    assert back.state is JobState.QUEUED
    for text in ("", "[]", '{"id": "other"}', json.dumps({"id": job.id, "kind": "NOPE"})):
        job_records.path(tmp_path, job.id).write_text(text)
        assert job_records.read(tmp_path, job.id) is None, text
    assert job_records.read(tmp_path, uuid.uuid4().hex) is None
    job_records.remove(tmp_path, job.id)
    assert not (tmp_path / job.id).exists()  # the folder too, once empty


def test_fitserve_up_registers_its_admin_token_again_after_redis_lost_its_data(
    url: str, r: redis.Redis, tmp_path: Path
) -> None:
    store, token_file = TokenStore(r), tmp_path / "admin.token"
    assert store.bootstrap_admin(token_file)
    r.flushdb()
    assert store.bootstrap_admin(token_file)  # the same token works again
    assert [t.name for t in store.list()] == ["fitserve-up-admin"]
    assert r.exists(ENABLED_KEY)
    store.revoke("fitserve-up-admin")
    assert not store.bootstrap_admin(token_file)  # revoked on purpose: it stays revoked
    assert store.list() == []
