"""Job leases against a real Redis: starting, renewing, handing back and reaping jobs,
each a compare-and-set, and the worker's writes fenced to its attempt."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from service.domain.job_store import AsyncJobStore, JobStore, StartOutcome
from service.domain.jobs import LEASES, JobState, events_key, history_key, job_key
from service.domain.leases import Heartbeat, JobControl, LeaseLost
from service.domain.reaper import Reaper
from tests.unit.service.domain.lease_helpers import Sent, create_job, job_states, reap, run_api

DB = 6  # this module's own database: the leases set is one key
OWNER = "host-a/101"


def _expire(r: redis.Redis, job_id: str) -> None:
    """Make the job's lease run out now, as if its worker had stopped renewing it."""
    r.hset(job_key(job_id), "lease_until", "0")
    r.zadd(LEASES, {job_id: 0})


def test_a_started_job_holds_a_lease_and_a_second_delivery_leaves_it_alone(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    worker, other = JobStore(r), JobStore(r)

    job = worker.start(job_id, 3, owner=OWNER, lease_seconds=30)
    assert job is not None
    assert job.attempt == 1
    assert job.lease_owner == OWNER
    assert job.lease_until > time.time() + 25
    assert r.zscore(LEASES, job_id) == pytest.approx(job.lease_until)

    outcome, again = other.start_outcome(job_id, 3, owner="host-b/7", lease_seconds=30)
    assert (outcome, again) == (StartOutcome.BUSY, None)
    assert worker.get(job_id).attempt == 1


def test_a_job_whose_lease_ran_out_or_whose_owner_died_is_taken_over(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    JobStore(r).start(job_id, 3, owner=OWNER)
    taken = JobStore(r).start(job_id, 3, owner="host-a/102", dead_owner=OWNER)
    assert taken is not None
    assert taken.attempt == 2

    _expire(r, job_id)
    third = JobStore(r).start(job_id, 3, owner="host-b/9")
    assert third is not None
    assert third.attempt == 3
    assert job_states(r, job_id) == [("QUEUED", 0), ("RUNNING", 1), ("RUNNING", 2), ("RUNNING", 3)]


def test_a_worker_that_lost_its_lease_can_neither_record_nor_finish_the_job(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    old, new = JobStore(r), JobStore(r)
    old.start(job_id, 3, owner=OWNER)
    assert old.record_epoch(job_id, 1, 3, {"loss": 1.0})
    _expire(r, job_id)
    new.start(job_id, 3, owner="host-b/9")

    assert old.heartbeat(job_id, 1, OWNER, 30) is None
    assert not old.record_epoch(job_id, 2, 3, {"loss": 0.5})
    assert not old.succeed(job_id, {"loss": 0.5}, 1)
    assert not old.fail(job_id, "INTERNAL", "stale")
    assert old.hand_back(job_id, OWNER, "stopping", 30)[0] == "lost"
    assert new.heartbeat(job_id, 2, "host-b/9", 30) is JobState.RUNNING
    assert new.record_epoch(job_id, 2, 3, {"loss": 0.4})
    assert new.record_epoch(job_id, 2, 3, {"loss": 0.4})  # a retry: recorded once
    assert [json.loads(e)["epoch"] for e in r.lrange(history_key(job_id), 0, -1)] == [1, 2]
    assert new.succeed(job_id, {"loss": 0.4}, 1)
    assert r.zscore(LEASES, job_id) is None  # finished: no lease to watch


def test_the_reaper_requeues_a_lost_job_once_and_its_next_attempt_starts(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    JobStore(r).start(job_id, 3, owner=OWNER)
    sent = Sent()
    assert reap(url, sent) == []  # the lease is alive
    _expire(r, job_id)

    assert reap(url, sent) == [f"{job_id}:requeue"]
    assert reap(url, sent) == []  # requeued and dispatched: nothing due
    assert sent.calls == [("TRAIN", job_id, "train")]
    assert JobStore(r).state(job_id) is JobState.QUEUED
    assert r.zscore(LEASES, job_id) is None
    again = JobStore(r).start(job_id, 3, owner="host-b/9")
    assert again is not None
    assert again.attempt == 2
    assert job_states(r, job_id) == [("QUEUED", 0), ("RUNNING", 1), ("QUEUED", 1), ("RUNNING", 2)]
    logs = [json.loads(f["data"]) for _i, f in r.xrange(events_key(job_id)) if f["type"] == "log"]
    assert "stopped renewing its lease" in logs[0]["message"]


def test_a_requeue_whose_message_was_never_confirmed_sent_is_sent_again(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    store = JobStore(r)
    store.start(job_id, 3, owner=OWNER)
    outcome, _token = store.hand_back(job_id, OWNER, "stopping", dispatch_seconds=30)
    assert outcome == "queued"  # ... and the worker died before it sent the message
    assert r.zscore(LEASES, job_id) is not None
    _expire(r, job_id)

    sent = Sent()
    assert reap(url, sent) == [f"{job_id}:requeue"]
    assert sent.calls == [("TRAIN", job_id, "train")]
    assert store.state(job_id) is JobState.QUEUED
    assert r.zscore(LEASES, job_id) is None


def test_a_cancelled_job_whose_worker_is_gone_ends_cancelled(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    JobStore(r).start(job_id, 3, owner=OWNER)
    run_api(url, lambda store: store.cancel(job_id))
    _expire(r, job_id)

    assert reap(url, Sent()) == [f"{job_id}:cancelled"]
    assert JobStore(r).state(job_id) is JobState.CANCELLED


def test_past_the_attempt_cap_the_reaper_fails_the_job_and_hand_backs_do_not_count(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    store = JobStore(r)
    store.start(job_id, 2, owner=OWNER)
    assert store.hand_back(job_id, OWNER, "stopping", 30)[0] == "queued"  # not counted
    store.start(job_id, 2, owner=OWNER)
    _expire(r, job_id)
    assert reap(url, Sent(), max_attempts=2) == [f"{job_id}:requeue"]  # one lost
    store.start(job_id, 2, owner=OWNER)
    _expire(r, job_id)

    sent = Sent()
    assert reap(url, sent, max_attempts=2) == [f"{job_id}:failed"]  # two lost
    assert sent.calls == []
    job = store.get(job_id)
    assert (job.state, job.attempt, job.handbacks) == (JobState.FAILED, 3, 1)
    assert job.error_reason == "WORKER_LOST"
    assert "lost 2 times" in job.error_message


def test_two_reapers_never_both_requeue(url: str, r: redis.Redis) -> None:
    ids = [create_job(url) for _ in range(20)]
    for job_id in ids:
        JobStore(r).start(job_id, 3, owner=OWNER)
        _expire(r, job_id)
    sent = Sent()

    async def body(store: AsyncJobStore) -> None:
        reapers = [
            Reaper(store, sent, lease_seconds=0, period_seconds=1, max_attempts=3) for _ in range(3)
        ]
        await asyncio.gather(*(reaper.reap() for reaper in reapers))

    run_api(url, body)
    assert sorted(job_id for _kind, job_id, _queue in sent.calls) == sorted(ids)


def test_no_reaping_until_redis_has_been_up_for_a_lease(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    JobStore(r).start(job_id, 3, owner=OWNER)
    _expire(r, job_id)
    uptime = int(r.info("server")["uptime_in_seconds"])

    assert reap(url, Sent(), lease=uptime + 3600) == []  # as if Redis had just restarted
    assert JobStore(r).state(job_id) is JobState.RUNNING


def test_the_heartbeat_renews_the_lease_and_stops_the_job_once_it_is_lost(
    url: str, r: redis.Redis
) -> None:
    job_id = create_job(url)
    store = JobStore(r)
    store.start(job_id, 3, owner=OWNER, lease_seconds=0.6)
    control = JobControl()
    with Heartbeat(store, job_id, 1, OWNER, 0.6, control) as beat:
        control.renew = beat.confirm
        time.sleep(1.5)  # past the first lease: renewed meanwhile
        assert float(str(r.hget(job_key(job_id), "lease_until"))) > time.time()
        control.confirm()
        JobStore(r).start(job_id, 3, owner="host-b/9", dead_owner=OWNER)  # taken over
        deadline = time.monotonic() + 5
        while not control.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert control.lost
    assert control.stopping
    with pytest.raises(LeaseLost):
        control.confirm()
    assert isinstance(control.stopped(), LeaseLost)


def test_a_finished_job_has_no_lease_to_renew_and_is_not_lost(url: str, r: redis.Redis) -> None:
    job_id = create_job(url)
    store = JobStore(r)
    store.start(job_id, 3, owner=OWNER)
    assert store.succeed(job_id, {"loss": 0.1}, 1)
    assert store.heartbeat(job_id, 1, OWNER, 30) is JobState.SUCCEEDED
    control = JobControl()
    beat = Heartbeat(store, job_id, 1, OWNER, 30, control)
    assert not beat.beat()
    assert beat.confirm()
    assert not control.lost
