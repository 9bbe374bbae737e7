"""Who created what, for tokens with the trainer role, and what each token has in use.

A trainer changes only the models and datasets it created and cancels only its own jobs
(``service.api.auth.Caller.check_owner``). Model and dataset owners are claims in one Redis
hash (``fitserve:owners``: ``model:<name>`` / ``dataset:<name>`` → token name), made when a
token first trains a model or uploads a dataset under a name nobody holds: the first claim
wins, atomically (HSETNX). A job's owner is in its record. Objects created while auth was
off, or whose claim Redis lost, have no owner: only an admin may change them.

Quotas count, per token, the jobs it has queued or running (a set of job ids per token,
pruned of finished jobs as it is read) and the bytes of the datasets it owns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import redis.asyncio as aioredis

from service.domain.jobs import JobState

OWNERS_KEY = "fitserve:owners"
ACTIVE_PREFIX = "fitserve:active_jobs:"


def _field(kind: str, name: str) -> str:
    return f"{kind}:{name}"


class Ownership:
    """Owner claims and per-token job counts in Redis (the api role's)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def owner(self, kind: str, name: str) -> str:
        """The token that created ``kind`` ``name`` ("": nobody known)."""
        return str(await self._r.hget(OWNERS_KEY, _field(kind, name)) or "")

    async def claim(self, kind: str, name: str, owner: str) -> str:
        """Claim ``name`` for ``owner`` unless someone holds it; returns the holder."""
        if owner:
            await self._r.hsetnx(OWNERS_KEY, _field(kind, name), owner)
        return await self.owner(kind, name)

    async def release(self, kind: str, name: str) -> None:
        await self._r.hdel(OWNERS_KEY, _field(kind, name))

    async def owned(self, kind: str, owner: str) -> list[str]:
        """Names of ``kind`` that ``owner`` holds."""
        raw = cast(dict[str, str], await self._r.hgetall(OWNERS_KEY))
        prefix = kind + ":"
        return [k[len(prefix) :] for k, v in raw.items() if k.startswith(prefix) and v == owner]

    async def add_job(self, owner: str, job_id: str) -> None:
        if owner:
            await self._r.sadd(ACTIVE_PREFIX + owner, job_id)

    async def active_jobs(
        self, owner: str, state: Callable[[str], Awaitable[JobState | None]]
    ) -> int:
        """How many of ``owner``'s jobs are queued or running; drops the finished ones
        (``state`` gives a job's state, None for a job whose record is gone)."""
        key = ACTIVE_PREFIX + owner
        ids = [str(i) for i in await self._r.smembers(key)]
        done = [i for i in ids if (s := await state(i)) is None or s.terminal]
        if done:
            await self._r.srem(key, *done)
        return len(ids) - len(done)
