"""What the lease and received-job tests share: the api's job store over a real Redis, a
job created through it, the reaper's sends recorded, one reaper pass, a job's states."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from service.domain.job_store import AsyncJobStore
from service.domain.jobs import Job, JobKind, events_key
from service.domain.reaper import Reaper


def run_api(url: str, body: Any) -> Any:
    """Run ``body(store)`` with the api's job store on ``url``, then close it."""

    async def main() -> Any:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        store = AsyncJobStore(client, retention_seconds=60)
        try:
            return await body(store)
        finally:
            await store.notifier.close()
            await client.aclose()

    return asyncio.run(main())


def create_job(url: str, kind: JobKind = JobKind.TRAIN) -> str:
    """A new QUEUED job of model "m" on the train queue; its id."""
    job = Job(id=uuid.uuid4().hex, kind=kind, model_name="m", queue="train", request={})

    async def body(store: AsyncJobStore) -> str:
        return (await store.create(job)).id

    return str(run_api(url, body))


class Sent:
    """The reaper's Celery sends, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, kind: str, job_id: str, queue: str) -> None:
        self.calls.append((kind, job_id, queue))


def reap(
    url: str, send: Sent, *, max_attempts: int = 3, lease: float = 0.0, ttl: float = 0.0
) -> list[str]:
    """One reaper pass: ``job_id:outcome`` of each job it looked at. ``ttl`` 0 by
    default: the test Redis may have been up for less than a real heartbeat TTL, before
    which received jobs are never sent again."""

    async def body(store: AsyncJobStore) -> list[str]:
        reaper = Reaper(
            store,
            send,
            lease_seconds=lease,
            period_seconds=1,
            max_attempts=max_attempts,
            heartbeat_ttl_seconds=ttl,
        )
        return [f"{x.job_id}:{x.outcome}" for x in await reaper.reap()]

    return list(run_api(url, body))


def job_states(r: redis.Redis, job_id: str) -> list[tuple[str, int]]:
    """The state events of a job's stream: (state, attempt)."""
    out = []
    for _id, fields in r.xrange(events_key(job_id)):
        if fields["type"] == "state":
            data = json.loads(fields["data"])
            out.append((data["state"], data.get("attempt", 0)))
    return out
