"""Job stores against a real Redis: how long a job's keys live, and the index forgetting
the ids of expired jobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from service.domain.job_store import AsyncJobStore, JobStore
from service.domain.jobs import (
    IDEMPOTENCY,
    INDEX,
    SWEEP,
    Job,
    JobKind,
    JobState,
    events_key,
    history_key,
    job_key,
)
from service.errors import NotFound

DAY = 24 * 3600
EXPIRY_WAIT = 10.0  # seconds; a 1 s retention is over well before this
DB = 5  # this module's own database: the index is one key, and the sweep reads all of it


def _job() -> Job:
    return Job(id=uuid.uuid4().hex, kind=JobKind.TRAIN, model_name="m", queue="train", request={})


def _keys(job_id: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), history_key(job_id)]


def _api(url: str, retention: int | None, body: Callable[[AsyncJobStore], Awaitable[Any]]) -> Any:
    """Run ``body`` with an api-side store on a client of its own event loop."""

    async def main() -> Any:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        store = AsyncJobStore(client, retention_seconds=retention)
        try:
            return await body(store)
        finally:
            await store.notifier.close()
            await client.aclose()

    return asyncio.run(main())


def _create(url: str, retention: int | None) -> str:
    async def body(store: AsyncJobStore) -> str:
        return (await store.create(_job())).id

    return str(_api(url, retention, body))


def _finished_through_the_worker(
    url: str, r: redis.Redis, retention: int | None, outcome: str
) -> str:
    """A job created by the api and moved to ``outcome`` by the worker, with an epoch."""
    job_id = _create(url, retention)
    worker = JobStore(r, retention_seconds=retention)
    assert worker.start(job_id, max_attempts=3) is not None
    worker.record_epoch(job_id, 1, 1, {"loss": 0.5})
    if outcome == "SUCCEEDED":
        assert worker.succeed(job_id, {"loss": 0.5}, 1)
    elif outcome == "FAILED":
        assert worker.fail(job_id, "INTERNAL", "it broke")
    else:
        _api(url, retention, lambda store: store.cancel(job_id))  # RUNNING -> CANCELLING
        assert worker.cancelled(job_id)
    assert worker.state(job_id) == JobState(outcome)
    return job_id


def _wait_until_gone(r: redis.Redis, job_id: str) -> None:
    deadline = time.monotonic() + EXPIRY_WAIT
    while r.exists(*_keys(job_id)):
        assert time.monotonic() < deadline, (
            f"keys of job {job_id} still there: {r.ttl(job_key(job_id))}"
        )
        time.sleep(0.05)


@pytest.mark.parametrize("outcome", ["SUCCEEDED", "FAILED", "CANCELLED"])
def test_a_job_finished_by_the_worker_keeps_its_keys_for_the_retention(
    url: str, r: redis.Redis, outcome: str
) -> None:
    job_id = _finished_through_the_worker(url, r, 30 * DAY, outcome)
    for key in _keys(job_id):
        assert 30 * DAY * 1000 - 60_000 < r.pttl(key) <= 30 * DAY * 1000, key


def test_a_queued_job_cancelled_by_the_api_keeps_its_keys_for_the_retention(
    url: str, r: redis.Redis
) -> None:
    job_id = _create(url, 3600)
    cancelled = _api(url, 3600, lambda store: store.cancel(job_id))
    assert cancelled.state is JobState.CANCELLED
    assert 3600 - 60 < r.ttl(job_key(job_id)) <= 3600
    assert 3600 - 60 < r.ttl(events_key(job_id)) <= 3600
    assert r.ttl(history_key(job_id)) == -2  # no epoch ran, so there is no history


def test_queued_running_and_cancelling_jobs_never_expire(url: str, r: redis.Redis) -> None:
    job_id = _create(url, 1)
    assert [r.ttl(k) for k in _keys(job_id)[:2]] == [-1, -1]  # queued: hash and stream
    worker = JobStore(r, retention_seconds=1)
    assert worker.start(job_id, max_attempts=3) is not None
    worker.record_epoch(job_id, 1, 2, {"loss": 0.5})
    worker.add_event(job_id, "batch", {"batch": 1})
    assert [r.ttl(k) for k in _keys(job_id)] == [-1, -1, -1]
    _api(url, 1, lambda store: store.cancel(job_id))
    assert worker.state(job_id) is JobState.CANCELLING
    assert [r.ttl(k) for k in _keys(job_id)] == [-1, -1, -1]


@pytest.mark.parametrize("outcome", ["SUCCEEDED", "FAILED", "CANCELLED"])
def test_without_a_retention_finished_jobs_are_kept_for_ever(
    url: str, r: redis.Redis, outcome: str
) -> None:
    job_id = _finished_through_the_worker(url, r, None, outcome)
    assert [r.ttl(k) for k in _keys(job_id)] == [-1, -1, -1]


def test_an_expired_job_is_not_found_nor_listed_and_leaves_the_index(
    url: str, r: redis.Redis
) -> None:
    job_id = _finished_through_the_worker(url, r, 1, "SUCCEEDED")
    kept = _create(url, None)  # queued: never expires
    _wait_until_gone(r, job_id)
    assert r.zscore(INDEX, job_id) is not None  # nothing has read past it yet

    async def body(store: AsyncJobStore) -> tuple[list[str], int]:
        with pytest.raises(NotFound):
            await store.get(job_id)
        jobs, next_offset = await store.query()
        return [j.id for j in jobs], next_offset

    assert _api(url, 1, body) == ([kept], 0)
    assert r.zrange(INDEX, 0, -1) == [kept]


def test_pages_of_the_list_skip_no_job_when_expired_ids_leave_the_index(
    url: str, r: redis.Redis
) -> None:
    ids = [_create(url, 1) for _ in range(7)]  # listed newest first: ids[6] .. ids[0]
    for job_id in ids[4:]:  # the first page's jobs expire
        _api(url, 1, lambda store, job_id=job_id: store.cancel(job_id))
    for job_id in ids[4:]:
        _wait_until_gone(r, job_id)

    async def every_page(store: AsyncJobStore) -> list[str]:
        listed: list[str] = []
        offset = 0
        while True:
            jobs, offset = await store.query(offset=offset, limit=2)
            listed += [j.id for j in jobs]
            if not offset:
                return listed

    assert _api(url, None, every_page) == ids[3::-1]
    assert r.zcard(INDEX) == 4


def test_a_new_job_drops_ids_of_expired_jobs_from_the_index(url: str, r: redis.Redis) -> None:
    expired = [_create(url, 1) for _ in range(3)]
    for job_id in expired:
        _api(url, 1, lambda store, job_id=job_id: store.cancel(job_id))
    for job_id in expired:
        _wait_until_gone(r, job_id)
    newest = _create(url, 1)  # no ListJobs: the new job's sweep does it
    assert r.zrange(INDEX, 0, -1) == [newest]


def test_the_sweep_keeps_old_jobs_whose_records_are_still_there(url: str, r: redis.Redis) -> None:
    queued = _create(url, 1)
    recently_finished = _create(url, 1)
    created = float(str(r.hget(job_key(recently_finished), "created_at")))
    time.sleep(max(0.0, created + 1.1 - time.time()))  # both now older than the retention
    _api(url, 1, lambda store: store.cancel(recently_finished))  # expires only in 1 s

    assert _api(url, 1, lambda store: store.sweep()) == 0
    assert set(r.zrange(INDEX, 0, -1)) == {queued, recently_finished}
    assert r.hget(job_key(queued), "state") == "QUEUED"


def test_old_jobs_still_queued_do_not_stop_the_sweep(url: str, r: redis.Redis) -> None:
    queued = [_create(url, 1) for _ in range(SWEEP + 4)]  # the oldest: more than one look
    expired = _create(url, 1)
    _api(url, 1, lambda store: store.cancel(expired))
    _wait_until_gone(r, expired)

    async def sweep_until_dropped(store: AsyncJobStore) -> int:
        for looks in range(1, 201):  # each look finds it with probability 1/5
            if await store.sweep():
                return looks
        return 0

    assert _api(url, 1, sweep_until_dropped) > 0
    assert set(r.zrange(INDEX, 0, -1)) == set(queued)


def test_the_sweep_does_nothing_without_a_retention(url: str, r: redis.Redis) -> None:
    job_id = _create(url, 1)
    r.delete(*_keys(job_id))  # as if it had expired long ago
    assert _api(url, None, lambda store: store.sweep()) == 0
    assert r.zrange(INDEX, 0, -1) == [job_id]


@pytest.mark.parametrize(("retention", "ttl"), [(None, 7 * DAY), (30 * DAY, 7 * DAY), (60, 60)])
def test_an_idempotency_key_never_outlives_the_job_it_names(
    url: str, r: redis.Redis, retention: int | None, ttl: int
) -> None:
    key = uuid.uuid4().hex

    async def twice(store: AsyncJobStore) -> tuple[str, str]:
        first = await store.create(_job(), idempotency_key=key)
        return first.id, (await store.create(_job(), idempotency_key=key)).id

    first, repeat = _api(url, retention, twice)
    assert first == repeat
    assert ttl - 60 < r.ttl(IDEMPOTENCY + key) <= ttl


def test_a_task_of_a_job_whose_record_expired_does_not_run(r: redis.Redis) -> None:
    worker = JobStore(r, retention_seconds=1)
    assert worker.start(uuid.uuid4().hex, max_attempts=3) is None


def test_failure_and_log_messages_are_redacted_and_capped(url: str, r: redis.Redis) -> None:
    job_id = _create(url, None)
    worker = JobStore(r, hidden={"/srv/fitserve/data": "<data folder>"})
    assert worker.start(job_id, max_attempts=3) is not None
    worker.add_event(job_id, "log", {"level": "WARNING", "message": "at /srv/fitserve/data/x"})
    message = (
        "OSError: cannot read /srv/fitserve/data/datasets/blobs/a.npz\n"
        "Traceback (most recent call last):\n"
        '  File "/opt/venv/lib/python3.11/site-packages/numpy/lib/npyio.py", line 9, in load\n'
        "    fid = open(file)\n" + "x" * 5000
    )

    assert worker.fail(job_id, "INTERNAL", message)
    job = worker.get(job_id)
    assert job.error_message.startswith(
        "OSError: cannot read <data folder>/datasets/blobs/a.npz\nxxx"
    )
    assert len(job.error_message) == 2000
    assert "Traceback" not in job.error_message
    assert "npyio" not in job.error_message
    events = r.xrange(events_key(job_id))
    logged = [e for _, e in events if e["type"] == "log"]
    assert "at <data folder>/x" in logged[0]["data"]
