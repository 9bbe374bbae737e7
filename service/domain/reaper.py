"""The reaper: moves on the jobs whose lease ran out (``service.domain.leases``).

Every api server runs one (``Reaper.start``), each pass every ``job_reaper_period_seconds``
(with some jitter, so replicas spread out). A pass reads the jobs whose lease is over by
Redis's clock and runs one compare-and-set per job (``AsyncJobStore.reap``), so two
reapers never both move a job: CANCELLING -> CANCELLED; RUNNING -> QUEUED and a new Celery
message (the next attempt resumes from the job's backup), or FAILED once the job has lost
``job_max_attempts`` attempts. A requeued job holds a dispatch lease until its message is
confirmed sent: a reaper that dies in between leaves it to the next pass, which sends it
again (a duplicate message is harmless: the worker that gets it finds the job started or
finished and drops it).

Right after Redis restarts, every lease may look run out (Redis was down while the
workers could not renew them), so no pass runs until Redis has been up for a whole lease:
by then every live worker has renewed its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable

import redis

from service.domain.job_store import AsyncJobStore, Reaped

log = logging.getLogger(__name__)
BATCH = 100  # jobs one pass looks at, at most

Send = Callable[[str, str, str], None]
"""Sends a job's Celery message: (kind, job id, queue)."""


class Reaper:
    """Finds jobs whose lease ran out and moves them on; see the module docstring."""

    def __init__(
        self,
        jobs: AsyncJobStore,
        send: Send,
        *,
        lease_seconds: float,
        period_seconds: float,
        max_attempts: int,
    ) -> None:
        self._jobs, self._send = jobs, send
        self._lease, self._period, self._max_attempts = lease_seconds, period_seconds, max_attempts
        self._failing = False

    def start(self) -> Callable[[], Awaitable[None]]:
        """Run passes on the running event loop until the returned closer is awaited."""
        task = asyncio.get_running_loop().create_task(self.run(), name="job-reaper")

        async def close() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return close

    async def run(self) -> None:
        """Passes, for ever; a pass that fails is logged and the next one tried."""
        while True:
            try:
                await self.reap()
                if self._failing:
                    log.info("the job reaper reaches Redis again")
                self._failing = False
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not self._failing:
                    log.warning("the job reaper cannot reach Redis (%s); retrying", exc)
                self._failing = True
            except Exception:
                log.exception("a job reaper pass failed")
            await asyncio.sleep(self._period * random.uniform(0.8, 1.2))

    async def reap(self) -> list[Reaped]:
        """One pass: what it did with each job whose lease had run out."""
        if await self._jobs.redis_uptime() < self._lease:
            return []  # Redis just came back: leave the workers a lease to renew theirs
        done: list[Reaped] = []
        for job_id in await self._jobs.due_leases(BATCH):
            token = uuid.uuid4().hex
            reaped = await self._jobs.reap(job_id, self._max_attempts, self._lease, token)
            if reaped.outcome == "requeue":
                await asyncio.to_thread(self._send, reaped.kind, job_id, reaped.queue)
                await self._jobs.dispatched(job_id, token)
            if reaped.outcome in ("requeue", "failed", "cancelled"):
                log.warning(
                    "job %s: its lease ran out; %s",
                    job_id,
                    {
                        "requeue": "queued again",
                        "failed": "failed (out of attempts)",
                        "cancelled": "cancelled",
                    }[reaped.outcome],
                )
            done.append(reaped)
        return done
