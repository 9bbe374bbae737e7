"""The job store: job records and event streams in Redis.

The keys are laid out in ``service.domain.jobs``. State changes are compare-and-set in one
Lua script that also appends the state event, so a watcher never misses a transition and
two processes never both move a job on.

With a retention, the step to a finished state also sets an expiry on all three keys, so
a finished job is kept that long and queued or running ones for ever. The index of all
jobs (``fitserve:jobs``) forgets the ids whose record has expired: those ListJobs reads
past, and a few of the oldest at each new job (``_SWEEP``).

``AsyncJobStore`` serves the api (grpc.aio); ``JobStore`` serves the worker (sync Celery).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from service.domain.job_watch import StreamNotifier
from service.domain.jobs import (
    IDEMPOTENCY,
    INDEX,
    JOB_BUCKETS,
    JOB_PREFIX,
    STATS,
    STREAM_MAXLEN,
    SWEEP,
    Job,
    JobEvent,
    JobKind,
    JobState,
    events_key,
    history_key,
    job_key,
)
from service.errors import FailedPrecondition, NotFound, Unavailable, plain_text, redacted, shown

MAX_ERROR_CHARS = 2000
_BUCKETS_LUA = ", ".join(map(str, JOB_BUCKETS))

# KEYS: job hash, events stream, job statistics hash, history list. ARGV: retention in
# seconds ("": for ever), allowed from-states (JSON list), new state, event JSON, now, then
# field/value pairs to set. Returns the previous state, or {err} when the job is missing,
# or the current state prefixed with "!" when refused. Statistics for operators are counted
# in the same step (``service.job_metrics``), and a finished job's keys get their expiry.
_TRANSITION = (
    """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return redis.error_reply('NOTFOUND') end
local allowed = cjson.decode(ARGV[2])
local ok = false
for _, s in ipairs(allowed) do if s == state then ok = true end end
if not ok then return '!' .. state end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*',
           'type', 'state', 'time', ARGV[5], 'data', ARGV[4])
local fields = redis.call('HMGET', KEYS[1], 'kind', 'created_at', 'started_at')
local kind, created, started = fields[1], fields[2], fields[3]
local now, new = tonumber(ARGV[5]), ARGV[3]
local function observe(name, seconds)
  for _, le in ipairs({"""
    + _BUCKETS_LUA
    + """}) do
    if seconds <= le then redis.call('HINCRBY', KEYS[3], name .. ':' .. kind .. ':' .. le, 1) end
  end
  redis.call('HINCRBY', KEYS[3], name .. ':' .. kind .. ':+Inf', 1)
  redis.call('HINCRBYFLOAT', KEYS[3], name .. '_sum:' .. kind, seconds)
end
local active = {RUNNING = true, CANCELLING = true}
if new == 'RUNNING' and state == 'QUEUED' then
  redis.call('HINCRBY', KEYS[3], 'running:' .. kind, 1)
  observe('queue_wait', now - tonumber(created))
end
if new == 'SUCCEEDED' or new == 'FAILED' or new == 'CANCELLED' then
  redis.call('HINCRBY', KEYS[3], 'finished:' .. kind .. ':' .. new, 1)
  if active[state] then
    redis.call('HINCRBY', KEYS[3], 'running:' .. kind, -1)
    observe('run', now - tonumber(started))
  end
  if ARGV[1] ~= '' then
    for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', key, ARGV[1]) end
  end
end
return state
"""
)

# KEYS: the index. ARGV: created-before time, a random fraction, how many to check, job key
# prefix. Checks up to that many ids created before the time (only those can have expired:
# a record is kept the retention after its job finished) and drops those whose record is
# gone. The window starts at a random place among them, so old jobs still queued or
# running at the front cannot stop the sweep. Reads job records by name, not KEYS: the
# transition already spans keys of several slots, so fitserve needs a single Redis anyway.
_SWEEP = """
local older = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
if older == 0 then return 0 end
local count = tonumber(ARGV[3])
local start = math.floor(tonumber(ARGV[2]) * (math.max(older - count, 0) + 1))
local gone = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], start, math.min(start + count, older) - 1)) do
  if redis.call('EXISTS', ARGV[4] .. id) == 0 then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""


def _encode(job: Job) -> dict[str, str]:
    return {
        "id": job.id,
        "kind": job.kind.value,
        "model_name": job.model_name,
        "queue": job.queue,
        "request": json.dumps(job.request),
        "state": job.state.value,
        "attempt": str(job.attempt),
        "created_at": repr(job.created_at),
        "started_at": repr(job.started_at),
        "finished_at": repr(job.finished_at),
        "metrics": json.dumps(job.metrics),
        "model_version": str(job.model_version),
        "error_reason": job.error_reason,
        "error_message": job.error_message,
        "labels": json.dumps(job.labels),
        "owner": job.owner,
    }


def _decode(h: Mapping[str, str], history: list[str]) -> Job:
    return Job(
        id=h["id"],
        kind=JobKind(h["kind"]),
        model_name=h["model_name"],
        queue=h["queue"],
        request=json.loads(h["request"]),
        state=JobState(h["state"]),
        attempt=int(h["attempt"]),
        created_at=float(h["created_at"]),
        started_at=float(h["started_at"]),
        finished_at=float(h["finished_at"]),
        metrics=json.loads(h["metrics"]),
        model_version=int(h["model_version"]),
        error_reason=h["error_reason"],
        error_message=h["error_message"],
        labels=json.loads(h["labels"]),
        history=[json.loads(e) for e in history],
        owner=h.get("owner", ""),
    )


def _transition_args(
    allowed: list[JobState], to: JobState, event: dict[str, Any], fields: dict[str, str]
) -> list[str]:
    pairs = [x for kv in fields.items() for x in kv]
    data = json.dumps({"state": to.value, **event})
    return [json.dumps([s.value for s in allowed]), to.value, data, repr(time.time()), *pairs]


def _transition_keys(job_id: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), STATS, history_key(job_id)]


def _retention_arg(seconds: int | None) -> str:
    return "" if seconds is None else str(seconds)


def _event(entry_id: str, fields: Mapping[str, str]) -> JobEvent:
    return JobEvent(entry_id, fields["type"], json.loads(fields["data"]), float(fields["time"]))


def _previous_state(result: str) -> JobState | None:
    """The state a transition moved from, or None when the script refused it."""
    return None if result.startswith("!") else JobState(result)


class AsyncJobStore:
    """The api's view of jobs: create, read, list, watch, cancel.

    ``retention_seconds``: how long a job's records outlive its finish (None: for ever).
    """

    def __init__(self, client: aioredis.Redis, *, retention_seconds: int | None = None) -> None:
        self._r = client
        self._retention = retention_seconds
        self._transition = client.register_script(_TRANSITION)
        self._sweep = client.register_script(_SWEEP)
        self.notifier = StreamNotifier(client)

    async def create(self, job: Job, idempotency_key: str = "") -> Job:
        """Store a new QUEUED job; with a key, a repeat returns the first job instead."""
        await self.sweep()
        if idempotency_key:
            key = IDEMPOTENCY + idempotency_key
            if not await self._r.set(key, job.id, nx=True, ex=self._idempotency_seconds()):
                existing = await self._r.get(key)
                return await self.get(str(existing))
        job.created_at = time.time()
        event = json.dumps({"state": job.state.value, "attempt": 0})
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), mapping=cast(Any, _encode(job)))
            pipe.zadd(INDEX, {job.id: job.created_at})
            pipe.xadd(
                events_key(job.id),
                {"type": "state", "time": repr(job.created_at), "data": event},
                maxlen=STREAM_MAXLEN,
            )
            await pipe.execute()
        return job

    async def get(self, job_id: str) -> Job:
        """One job, with its history."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.lrange(history_key(job_id), 0, -1)
            h, history = await pipe.execute()
        if not h:
            raise NotFound(f"job {shown(job_id)} not found")
        return _decode(h, history)

    async def query(
        self,
        *,
        state: str = "",
        kind: str = "",
        model_name: str = "",
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[Job], int]:
        """Jobs newest first matching the filters; returns them and the next offset (0: end)."""
        found: list[Job] = []
        expired: list[str] = []
        position = offset
        while len(found) < limit:
            ids = await self._r.zrevrange(INDEX, position, position + 4 * limit - 1)
            if not ids:
                break
            for job_id in ids:
                position += 1
                job = await self._maybe_get(str(job_id))
                if job is None:
                    expired.append(str(job_id))
                elif _matches(job, state, kind, model_name):
                    found.append(job)
                    if len(found) == limit:
                        break
        if expired:  # their records are gone; the next page starts that much earlier
            position -= int(await self._r.zrem(INDEX, *expired))  # as many as this call removed
        more = await self._r.zcard(INDEX) > position
        return found, position if more else 0

    async def sweep(self) -> int:
        """Drop from the index up to ``SWEEP`` ids of jobs whose records have expired, among
        those created before the retention; returns how many. Each new job calls it, so
        ids of expired jobs leave the index even when nobody lists that far back."""
        if self._retention is None:
            return 0
        cutoff = time.time() - self._retention
        args = [repr(cutoff), repr(random.random()), str(SWEEP), JOB_PREFIX]
        return int(await self._sweep(keys=[INDEX], args=args))

    async def state(self, job_id: str) -> JobState:
        """The current state of a job."""
        value = await self._r.hget(job_key(job_id), "state")
        if value is None:
            raise NotFound(f"job {shown(job_id)} not found")
        return JobState(str(value))

    async def events(self, job_id: str, after: str) -> list[JobEvent]:
        """Events after ``after`` ("" : from the start), without waiting."""
        reply = await self._r.xread({events_key(job_id): after or "0-0"}, count=100)
        streams = cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply)
        return [_event(eid, f) for _stream, entries in streams for eid, f in entries]

    async def wait_for_events(self, job_id: str, after: str, longest: float) -> None:
        """Return once the job has an event after ``after``, or after ``longest`` s."""
        await self.notifier.wait(events_key(job_id), after, longest)

    async def cancel(self, job_id: str) -> Job:
        """QUEUED -> CANCELLED at once; RUNNING -> CANCELLING, the worker stops it."""
        now = {"finished_at": repr(time.time())}
        args = _transition_args([JobState.QUEUED], JobState.CANCELLED, {}, now)
        if await self._run(job_id, args) is None:
            args = _transition_args([JobState.RUNNING], JobState.CANCELLING, {}, {})
            if await self._run(job_id, args) is None:
                job = await self.get(job_id)
                if job.state is not JobState.CANCELLING:
                    raise FailedPrecondition(
                        f"job {job_id} is {job.state.value}; only queued or running jobs can be "
                        "cancelled"
                    )
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        """Remove a job that was never queued (its task could not be sent)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(job_key(job_id), history_key(job_id), events_key(job_id))
            pipe.zrem(INDEX, job_id)
            await pipe.execute()

    async def ping(self) -> None:
        """Raise Unavailable when Redis does not answer."""
        try:
            await self._r.ping()
        except redis.RedisError as exc:
            raise Unavailable(f"Redis is unavailable: {exc}") from None

    async def _run(self, job_id: str, args: list[str]) -> JobState | None:
        try:
            result = await self._transition(
                keys=_transition_keys(job_id), args=[_retention_arg(self._retention), *args]
            )
        except redis.ResponseError as exc:
            if "NOTFOUND" in str(exc):
                raise NotFound(f"job {shown(job_id)} not found") from None
            raise
        return _previous_state(str(result))

    def _idempotency_seconds(self) -> int:
        """A week, but never past the retention: the key then expires before the job it
        names (which is kept the retention after it finished), so a repeat finds the job."""
        week = 7 * 24 * 3600
        return week if self._retention is None else min(week, self._retention)

    async def _maybe_get(self, job_id: str) -> Job | None:
        try:
            return await self.get(job_id)
        except NotFound:
            return None


def _matches(job: Job, state: str, kind: str, model_name: str) -> bool:
    return (
        (not state or job.state.value == state)
        and (not kind or job.kind.value == kind)
        and (not model_name or job.model_name == model_name)
    )


class JobStore:
    """The worker's view of jobs: start, report progress, finish.

    ``retention_seconds``: how long a job's records outlive its finish (None: for ever).
    ``hidden``: server folders (the data folder) that no failure or log message a caller
    reads may spell out, each with the words that name it instead; such messages also
    lose traceback lines and source paths (``service.errors.redacted``).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_seconds: int | None = None,
        hidden: dict[str, str] | None = None,
    ) -> None:
        self._r = client
        self._retention = retention_seconds
        self._hidden = dict(hidden or {})
        self._transition = client.register_script(_TRANSITION)

    def get(self, job_id: str) -> Job:
        """One job, with its history."""
        h = cast(dict[str, str], self._r.hgetall(job_key(job_id)))
        if not h:
            raise NotFound(f"job {shown(job_id)} not found")
        return _decode(h, cast(list[str], self._r.lrange(history_key(job_id), 0, -1)))

    def start(self, job_id: str, max_attempts: int) -> Job | None:
        """Move a job to RUNNING and count the attempt; None when it must not run (also
        when its record is gone: a task of a job cancelled while queued, taken after the
        retention)."""
        try:
            state = self.state(job_id)
        except NotFound:
            return None
        if state is JobState.CANCELLING:
            self._run(job_id, _transition_args([state], JobState.CANCELLED, {}, _now_done()))
        if state not in (JobState.QUEUED, JobState.RUNNING):
            return None
        attempt = int(self._r.hincrby(job_key(job_id), "attempt", 1))
        if attempt > max_attempts:
            self.fail(
                job_id,
                "WORKER_LOST",
                f"the worker running this job was lost {max_attempts} "
                "times; the job is not retried again",
                from_running_only=False,
            )
            return None
        fields = {"started_at": repr(time.time())}
        args = _transition_args(
            [JobState.QUEUED, JobState.RUNNING], JobState.RUNNING, {"attempt": attempt}, fields
        )
        if self._run(job_id, args) is None:
            args = _transition_args([JobState.CANCELLING], JobState.CANCELLED, {}, _now_done())
            self._run(job_id, args)
            return None
        return self.get(job_id)

    def state(self, job_id: str) -> JobState:
        """The current state (the worker polls it for cancellation)."""
        value = self._r.hget(job_key(job_id), "state")
        if value is None:
            raise NotFound(f"job {shown(job_id)} not found")
        return JobState(str(value))

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Append an epoch, batch or log event to the job's stream (a log event's message
        redacted)."""
        if isinstance(data.get("message"), str):
            data = data | {"message": redacted(data["message"], self._hidden)}
        self._r.xadd(
            events_key(job_id),
            {"type": kind, "time": repr(time.time()), "data": json.dumps(data)},
            maxlen=STREAM_MAXLEN,
        )

    def record_epoch(self, job_id: str, epoch: int, epochs: int, logs: dict[str, float]) -> None:
        """Store an epoch's logs in the history and stream them."""
        self._r.rpush(history_key(job_id), json.dumps({"epoch": epoch, "logs": logs}))
        self.add_event(job_id, "epoch", {"epoch": epoch, "epochs": epochs, "logs": logs})

    def reset_history(self, job_id: str, keep_epochs: int) -> None:
        """Drop history past the epochs a resumed attempt restarts from."""
        if keep_epochs <= 0:
            self._r.delete(history_key(job_id))  # LTRIM 0 -1 would keep everything
        else:
            self._r.ltrim(history_key(job_id), 0, keep_epochs - 1)

    def succeed(self, job_id: str, metrics: dict[str, float], version: int) -> bool:
        """RUNNING -> SUCCEEDED with the final metrics and the published version."""
        fields = _now_done() | {"metrics": json.dumps(metrics), "model_version": str(version)}
        event = {"metrics": metrics, "model_version": version}
        args = _transition_args([JobState.RUNNING], JobState.SUCCEEDED, event, fields)
        return self._run(job_id, args) is not None

    def cancelled(self, job_id: str) -> bool:
        """CANCELLING -> CANCELLED once the worker has stopped."""
        args = _transition_args(
            [JobState.CANCELLING, JobState.RUNNING], JobState.CANCELLED, {}, _now_done()
        )
        return self._run(job_id, args) is not None

    def fail(
        self, job_id: str, reason: str, message: str, *, from_running_only: bool = True
    ) -> bool:
        """-> FAILED with a reason code and a message a person can act on, redacted: no
        traceback lines, source paths or hidden folders, at most MAX_ERROR_CHARS."""
        allowed = [JobState.RUNNING, JobState.CANCELLING]
        if not from_running_only:
            allowed.append(JobState.QUEUED)
        # A worker's message may carry Keras's colors, and paths of the server's.
        message = redacted(plain_text(message), self._hidden)[:MAX_ERROR_CHARS]
        fields = _now_done() | {"error_reason": reason, "error_message": message}
        event = {"error": {"reason": reason, "message": message}}
        return (
            self._run(job_id, _transition_args(allowed, JobState.FAILED, event, fields)) is not None
        )

    def _run(self, job_id: str, args: list[str]) -> JobState | None:
        try:
            result = self._transition(
                keys=_transition_keys(job_id), args=[_retention_arg(self._retention), *args]
            )
        except redis.ResponseError as exc:
            if "NOTFOUND" in str(exc):
                raise NotFound(f"job {shown(job_id)} not found") from None
            raise
        return _previous_state(str(result))


def _now_done() -> dict[str, str]:
    return {"finished_at": repr(time.time())}
