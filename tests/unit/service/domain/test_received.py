"""Jobs a worker received but never started, against a real Redis: the mark a worker's
main process writes as the message arrives, and the reaper sending the job's message
again (once, whatever the number of reapers) when that worker's alive key is gone."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from types import SimpleNamespace

import pytest
import redis

from service.config import Settings
from service.domain.job_store import AsyncJobStore, JobStore, StartOutcome
from service.domain.jobs import (
    LEASES,
    JobState,
    alive_key,
    events_key,
    job_key,
    worker_process,
)
from service.domain.reaper import Reaper
from tests.unit.service.domain.lease_helpers import Sent, create_job, job_states, reap, run_api

DB = 9  # this module's own database: the leases set is one key
WORKER = worker_process("fitserve-1@host-a", 4242)
TTL = 15.0


def _due_now(r: redis.Redis, job_id: str) -> None:
    """As if the mark's TTL had passed."""
    r.zadd(LEASES, {job_id: 0})


def _logs(r: redis.Redis, job_id: str) -> list[str]:
    return [
        json.loads(f["data"])["message"]
        for _id, f in r.xrange(events_key(job_id))
        if f["type"] == "log"
    ]


def test_a_received_job_is_marked_and_watched_until_a_child_starts_it(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    before = time.time()
    assert JobStore(r).mark_received(job_id, WORKER, TTL)
    h = r.hgetall(job_key(job_id))
    assert h["state"] == "QUEUED"
    assert h["received_by"] == WORKER
    assert float(h["received_at"]) >= before - 1
    assert r.zscore(LEASES, job_id) == pytest.approx(float(h["received_at"]) + TTL)

    job = JobStore(r).start(job_id, 3, owner="host-a/4243", lease_seconds=30)
    assert job is not None
    assert job.attempt == 1
    h = r.hgetall(job_key(job_id))
    assert h["received_by"] == ""  # started: the lease watches it now
    assert float(str(r.zscore(LEASES, job_id))) == pytest.approx(job.lease_until)
    # a duplicate received while it runs marks nothing
    assert not JobStore(r).mark_received(job_id, "other@host/1", TTL)
    assert r.hget(job_key(job_id), "received_by") == ""


def test_while_the_receiving_worker_runs_the_job_is_left_alone(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    r.set(alive_key(WORKER), "train,cpu", px=60_000)
    _due_now(r, job_id)
    sent = Sent()

    assert reap(url, sent) == [f"{job_id}:alive"]
    assert sent.calls == []
    assert r.hget(job_key(job_id), "received_by") == WORKER
    assert float(str(r.zscore(LEASES, job_id))) > time.time() - 5  # looked at again later
    assert _logs(r, job_id) == []


def test_a_job_whose_receiving_worker_died_is_sent_again_once_at_the_same_attempt(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)  # no alive key: the worker is gone
    _due_now(r, job_id)
    sent = Sent()

    assert reap(url, sent) == [f"{job_id}:resend"]
    assert sent.calls == [("TRAIN", job_id, "train")]
    h = r.hgetall(job_key(job_id))
    assert (h["state"], h["attempt"], h["received_by"], h["dispatch"]) == ("QUEUED", "0", "", "")
    assert r.zscore(LEASES, job_id) is None  # its message is sent: nothing left to watch
    [line] = _logs(r, job_id)
    assert line.startswith(f"requeued: worker {WORKER} stopped before starting the job")
    assert reap(url, sent) == []  # nothing more to do
    assert len(sent.calls) == 1

    # the new message runs it as attempt 1; the old one, redelivered, is dropped
    job = JobStore(r).start(job_id, 3, owner="host-b/7", lease_seconds=30)
    assert job is not None
    assert job.attempt == 1
    assert JobStore(r).start_outcome(job_id, 3, owner="host-b/8")[0] is StartOutcome.BUSY
    assert JobStore(r).succeed(job_id, {"loss": 0.1}, 1)
    assert JobStore(r).start_outcome(job_id, 3, owner="host-b/8")[0] is StartOutcome.DONE
    assert job_states(r, job_id) == [("QUEUED", 0), ("RUNNING", 1), ("SUCCEEDED", 0)]


def test_an_expired_alive_key_counts_as_gone(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    r.set(alive_key(WORKER), "train", px=200)
    _due_now(r, job_id)
    time.sleep(0.4)
    assert reap(url, Sent()) == [f"{job_id}:resend"]


def test_two_reapers_never_both_send_a_received_job_again(url: str, r: redis.Redis) -> None:
    ids = [create_job(url) for _ in range(20)]
    for job_id in ids:
        JobStore(r).mark_received(job_id, WORKER, TTL)
        _due_now(r, job_id)
    sent = Sent()

    async def body(store: AsyncJobStore) -> None:
        reapers = [
            Reaper(
                store,
                sent,
                lease_seconds=0,
                period_seconds=1,
                max_attempts=3,
                heartbeat_ttl_seconds=0,
            )
            for _ in range(3)
        ]
        await asyncio.gather(*(reaper.reap() for reaper in reapers))

    run_api(url, body)
    assert sorted(job_id for _kind, job_id, _queue in sent.calls) == sorted(ids)
    for job_id in ids:
        assert len(_logs(r, job_id)) == 1


def test_a_send_that_was_never_confirmed_is_sent_again(url: str, r: redis.Redis) -> None:
    """The reaper died between its compare-and-set and the send: the dispatch lease it
    took runs out and a later pass sends the message."""
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    _due_now(r, job_id)

    async def crashed(store: AsyncJobStore) -> str:
        return (await store.reap(job_id, 3, 0.0, "token-1")).outcome  # never sent

    assert run_api(url, crashed) == "resend"
    r.hset(job_key(job_id), "lease_until", "0")
    _due_now(r, job_id)
    sent = Sent()
    assert reap(url, sent) == [f"{job_id}:requeue"]
    assert sent.calls == [("TRAIN", job_id, "train")]
    assert len(_logs(r, job_id)) == 1  # the why is said once


def test_a_message_received_ends_a_dispatch_lease_and_a_late_confirmation_keeps_the_watch(
    url: str, r: redis.Redis
) -> None:
    """A requeue's new message reached a worker before the reaper confirmed it sent: the
    confirmation must not drop the new worker's watch."""
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    _due_now(r, job_id)

    async def resend(store: AsyncJobStore) -> str:
        return (await store.reap(job_id, 3, 5.0, "token-1")).outcome

    assert run_api(url, resend) == "resend"
    second = worker_process("fitserve-1@host-a", 5555)
    assert JobStore(r).mark_received(job_id, second, TTL)
    assert r.hget(job_key(job_id), "dispatch") == ""
    assert not JobStore(r).dispatched(job_id, "token-1")
    assert r.hget(job_key(job_id), "received_by") == second
    assert r.zscore(LEASES, job_id) is not None


def test_a_job_nobody_received_is_left_as_it_is(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    r.zadd(LEASES, {job_id: 0})  # even if it were in the set
    sent = Sent()
    assert reap(url, sent) == [f"{job_id}:skip"]
    assert sent.calls == []
    assert r.zscore(LEASES, job_id) is None
    assert r.hget(job_key(job_id), "state") == "QUEUED"


def test_no_resend_until_redis_has_been_up_for_a_heartbeat_ttl(url: str, r: redis.Redis) -> None:
    """Right after a Redis restart the alive keys may have expired while Redis was down;
    the workers get a TTL to write them again."""
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    _due_now(r, job_id)
    uptime = int(r.info("server")["uptime_in_seconds"])
    sent = Sent()
    assert reap(url, sent, ttl=uptime + 3600) == [f"{job_id}:alive"]
    assert sent.calls == []


def test_a_cancelled_received_job_leaves_the_watch(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)

    async def cancel(store: AsyncJobStore) -> JobState:
        return (await store.cancel(job_id)).state

    assert run_api(url, cancel) is JobState.CANCELLED
    assert r.zscore(LEASES, job_id) is None


def test_a_handed_back_job_is_not_taken_for_a_received_one(url: str, r: redis.Redis) -> None:
    """The mark is cleared at the start, so a job queued again later is watched by its
    dispatch lease only, not by the stale mark of the worker that first received it."""
    job_id = create_job(url)
    JobStore(r).mark_received(job_id, WORKER, TTL)
    store = JobStore(r)
    store.start(job_id, 3, owner="host-a/4243")
    outcome, token = store.hand_back(job_id, "host-a/4243", "stopping", dispatch_seconds=5)
    assert outcome == "queued"
    assert store.dispatched(job_id, token)
    assert r.zscore(LEASES, job_id) is None
    assert reap(url, Sent()) == []


def test_the_heartbeat_ttl_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().heartbeat_ttl_seconds == 15.0
    assert Settings(worker_heartbeat_seconds=2).heartbeat_ttl_seconds == 6.0
    assert Settings(worker_heartbeat_ttl_seconds=8).heartbeat_ttl_seconds == 8.0
    monkeypatch.setenv("FITSERVE_WORKER_HEARTBEAT_TTL_SECONDS", "3")
    monkeypatch.setenv("FITSERVE_WORKER_HEARTBEAT_SECONDS", "1")
    assert Settings().heartbeat_ttl_seconds == 3.0
    with pytest.raises(ValueError, match="must be longer than"):  # pydantic's error is one
        Settings(worker_heartbeat_seconds=5, worker_heartbeat_ttl_seconds=5)


def test_the_worker_marks_each_received_message(url: str, r: redis.Redis) -> None:
    """The task_received handler of the worker's main process."""
    from worker.received import ReceivedMarks

    job_id = create_job(url)
    marks = ReceivedMarks(Settings(redis_url=url))
    sender, request = SimpleNamespace(hostname="fitserve-9@host-c"), SimpleNamespace(id=job_id)
    marks._on_received(sender=sender, request=request)

    assert r.hget(job_key(job_id), "received_by") == f"fitserve-9@host-c/{os.getpid()}"
    marks._on_received(sender=sender, request=SimpleNamespace(id=uuid.uuid4().hex))  # unknown


def test_a_worker_that_cannot_reach_redis_still_takes_the_message() -> None:
    from worker.received import ReceivedMarks

    marks = ReceivedMarks(Settings(redis_url="redis://127.0.0.1:1/0"))
    sender, request = SimpleNamespace(hostname="w@h"), SimpleNamespace(id=uuid.uuid4().hex)
    marks._on_received(sender=sender, request=request)  # logged, not raised
