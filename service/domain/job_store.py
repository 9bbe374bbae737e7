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

import enum
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis

from service.domain.job_watch import StreamNotifier
from service.domain.jobs import (
    ALIVE_PREFIX,
    IDEMPOTENCY,
    INDEX,
    JOB_BUCKETS,
    JOB_PREFIX,
    LEASES,
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

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 2000
_BUCKETS_LUA = ", ".join(map(str, JOB_BUCKETS))

# Shared by every script that changes a job's state. KEYS: job hash, events stream, job
# statistics hash, history list, leases sorted set. ``move`` sets the new state and the
# given fields, appends the state event, counts the statistics for operators
# (``service.job_metrics``), and on a finished state sets the keys' expiry and drops the
# job from the leases. ``clock`` is Redis's own time, which every lease is measured by, so
# the clocks of workers and api servers never matter.
_LIB = (
    """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function observe(kind, name, seconds)
  for _, le in ipairs({"""
    + _BUCKETS_LUA
    + """}) do
    if seconds <= le then redis.call('HINCRBY', KEYS[3], name .. ':' .. kind .. ':' .. le, 1) end
  end
  redis.call('HINCRBY', KEYS[3], name .. ':' .. kind .. ':+Inf', 1)
  redis.call('HINCRBYFLOAT', KEYS[3], name .. '_sum:' .. kind, seconds)
end
local function move(state, new, data, now, retention, fields)
  redis.call('HSET', KEYS[1], 'state', new)
  for i = 1, #fields, 2 do redis.call('HSET', KEYS[1], fields[i], fields[i + 1]) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*',
             'type', 'state', 'time', now, 'data', data)
  local h = redis.call('HMGET', KEYS[1], 'kind', 'created_at', 'started_at', 'queued_at', 'id')
  local kind, created, started, queued = h[1], h[2], h[3], h[4]
  local t = tonumber(now)
  local active = {RUNNING = true, CANCELLING = true}
  if new == 'RUNNING' and state == 'QUEUED' then
    redis.call('HINCRBY', KEYS[3], 'running:' .. kind, 1)
    observe(kind, 'queue_wait', t - tonumber(queued or created))
  end
  if new == 'QUEUED' and active[state] then
    redis.call('HINCRBY', KEYS[3], 'running:' .. kind, -1)
  end
  if new == 'SUCCEEDED' or new == 'FAILED' or new == 'CANCELLED' then
    redis.call('HINCRBY', KEYS[3], 'finished:' .. kind .. ':' .. new, 1)
    if new == 'FAILED' then  -- by reason, for fitserve_jobs_failed_total
      local why = redis.call('HGET', KEYS[1], 'error_reason') or ''
      redis.call('HINCRBY', KEYS[3], 'failed:' .. kind .. ':' .. why, 1)
    end
    if active[state] then
      redis.call('HINCRBY', KEYS[3], 'running:' .. kind, -1)
      observe(kind, 'run', t - tonumber(started))
    end
    if retention ~= '' then
      for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', key, retention) end
    end
    redis.call('ZREM', KEYS[5], h[5])
  end
end
local function log_event(now, level, message)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'type', 'log', 'time', now,
             'data', cjson.encode({level = level, message = message}))
end
"""
)

# ARGV: retention in seconds ("": for ever), allowed from-states (JSON list), new state,
# event JSON, now, the attempt the caller runs ("": any), then field/value pairs to set.
# Returns the previous state, or {err} when the job is missing, or the current state
# prefixed with "!" when refused (another state, or another attempt holds the job now).
_TRANSITION = (
    _LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return redis.error_reply('NOTFOUND') end
local allowed = cjson.decode(ARGV[2])
local ok = false
for _, s in ipairs(allowed) do if s == state then ok = true end end
if not ok then return '!' .. state end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[6] then return '!' .. state end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
move(state, ARGV[3], ARGV[4], ARGV[5], ARGV[1], fields)
return state
"""
)

# A worker taking a job's message. ARGV: retention, attempt cap, lease seconds, owner, now,
# an owner known to be dead ("": none), the message of a job out of attempts. A QUEUED
# job, or a RUNNING one whose lease ran out (its worker was lost), becomes RUNNING with
# the next attempt and a lease; a job another attempt holds a live lease on is left alone
# (this message is a duplicate: a redelivery or a second requeue), as is a finished one.
# Returns {outcome, attempt}: started, busy, cancelled, failed, done or gone.
_START = (
    _LIB
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'handbacks', 'lease_until',
                     'lease_owner', 'id')
local state = h[1]
if not state then return {'gone', 0} end
local now, retention = ARGV[5], ARGV[1]
local live = (tonumber(h[4]) or 0) > clock() and not (ARGV[6] ~= '' and h[5] == ARGV[6])
if state == 'CANCELLING' then
  if live then return {'busy', tonumber(h[2]) or 0} end
  move(state, 'CANCELLED', cjson.encode({state = 'CANCELLED'}), now, retention,
       {'finished_at', now})
  return {'cancelled', tonumber(h[2]) or 0}
end
if state ~= 'QUEUED' and state ~= 'RUNNING' then return {'done', tonumber(h[2]) or 0} end
if state == 'RUNNING' and live then return {'busy', tonumber(h[2]) or 0} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt - (tonumber(h[3]) or 0) > tonumber(ARGV[2]) then
  local err = {reason = 'WORKER_LOST', message = ARGV[7]}
  move(state, 'FAILED', cjson.encode({state = 'FAILED', error = err}), now, retention,
       {'finished_at', now, 'error_reason', err.reason, 'error_message', err.message})
  return {'failed', attempt}
end
local until_ = clock() + tonumber(ARGV[3])
move(state, 'RUNNING', cjson.encode({state = 'RUNNING', attempt = attempt}), now, retention,
     {'started_at', now, 'lease_until', tostring(until_), 'lease_owner', ARGV[4],
      'dispatch', '', 'received_by', '', 'received_at', ''})
redis.call('ZADD', KEYS[5], until_, h[6])
return {'started', attempt}
"""
)

# A worker's main process has received a job's message (Celery's task_received, before a
# pool child starts the job). KEYS: job hash, leases. ARGV: the worker process
# (hostname/pid), seconds until the reaper first looks at it (the heartbeat's TTL). Only
# a QUEUED job is marked: ``received_by`` names the worker, and the job is in the leases
# set so the reaper checks, once that worker's alive key could have expired, that it
# still runs (``_REAP``). The job's message is delivered, so a dispatch lease (a requeue
# whose send was not confirmed yet) is over. Returns 1 (marked) or 0 (not QUEUED: a
# duplicate of a job running or finished, which the worker drops when it starts).
_RECEIVED = """
local h = redis.call('HMGET', KEYS[1], 'state', 'id')
if h[1] ~= 'QUEUED' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'received_by', ARGV[1], 'received_at', tostring(now),
           'dispatch', '', 'lease_until', '0')
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), h[2])
return 1
"""

# The running attempt renewing its lease. KEYS: job hash, leases. ARGV: attempt, owner,
# lease seconds. Returns the state: RUNNING or CANCELLING (renewed), or the finished state
# this attempt left it in (nothing to renew); or "!" and why the lease is not this
# attempt's any more (another attempt holds it, the job was requeued, or it is "gone").
_HEARTBEAT = """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'lease_owner', 'id')
if not h[1] then return '!gone' end
if h[2] ~= ARGV[1] or h[3] ~= ARGV[2] then return '!lost' end
if h[1] == 'SUCCEEDED' or h[1] == 'FAILED' or h[1] == 'CANCELLED' then return h[1] end
if h[1] ~= 'RUNNING' and h[1] ~= 'CANCELLING' then return '!' .. h[1] end
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', tostring(until_))
redis.call('ZADD', KEYS[2], until_, h[4])
return h[1]
"""

# A stopping worker handing its attempt back. ARGV: retention, attempt, owner, now,
# dispatch seconds, dispatch token, the log line saying why. RUNNING -> QUEUED (the
# hand-back is counted apart from lost attempts) with a dispatch lease: if the new Celery
# message is not confirmed sent (``_DISPATCHED``) before it runs out, the reaper sends it.
# CANCELLING -> CANCELLED. Returns queued, cancelled, or lost (not this attempt's job).
_HAND_BACK = (
    _LIB
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'lease_owner', 'id')
if not h[1] then return 'lost' end
if h[2] ~= ARGV[2] or h[3] ~= ARGV[3] then return 'lost' end
local now = ARGV[4]
if h[1] == 'CANCELLING' then
  move(h[1], 'CANCELLED', cjson.encode({state = 'CANCELLED'}), now, ARGV[1], {'finished_at', now})
  return 'cancelled'
end
if h[1] ~= 'RUNNING' then return 'lost' end
local due = clock() + tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
log_event(now, 'INFO', ARGV[7])
move(h[1], 'QUEUED', cjson.encode({state = 'QUEUED', attempt = tonumber(h[2])}), now, ARGV[1],
     {'lease_until', tostring(due), 'lease_owner', '', 'dispatch', ARGV[6], 'queued_at', now})
redis.call('ZADD', KEYS[5], due, h[4])
return 'queued'
"""
)

# The reaper's step for one job whose lease looks run out. ARGV: retention, attempt cap,
# now, dispatch seconds, dispatch token, the message of a job out of attempts, the log
# line of a requeue, the alive key prefix of worker processes, seconds until a received
# job is looked at again, whether received jobs may be resent now ("1"; not right after
# Redis restarted), the log line of a resend. Returns {outcome, kind, queue}: alive
# (renewed meanwhile, or its receiving worker still runs), cancelled (CANCELLING, its
# worker gone), failed (out of attempts), requeue (the caller sends a new Celery message,
# then calls ``_DISPATCHED`` with the token), resend (the same, for a QUEUED job whose
# receiving worker stopped before starting it: the attempt stays), or skip.
_REAP = (
    _LIB
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'handbacks', 'lease_until',
                     'dispatch', 'kind', 'queue', 'id', 'received_by')
local state = h[1]
if not state then return {'skip', '', ''} end
local t, now, retention = clock(), ARGV[3], ARGV[1]
local lease = tonumber(h[4]) or 0
local dispatching = state == 'QUEUED' and h[5] and h[5] ~= ''
local received = state == 'QUEUED' and not dispatching and h[9] and h[9] ~= ''
local watched = state == 'RUNNING' or state == 'CANCELLING' or dispatching or received
if not watched then
  redis.call('ZREM', KEYS[5], h[8])
  return {'skip', h[6], h[7]}
end
if received then
  if ARGV[10] ~= '1' or redis.call('EXISTS', ARGV[8] .. h[9]) == 1 then
    redis.call('ZADD', KEYS[5], t + tonumber(ARGV[9]), h[8])
    return {'alive', h[6], h[7]}
  end
  local due = t + tonumber(ARGV[4])
  log_event(now, 'WARNING', (string.gsub(ARGV[11], '{worker}', function() return h[9] end)))
  redis.call('HSET', KEYS[1], 'received_by', '', 'received_at', '', 'lease_until',
             tostring(due), 'dispatch', ARGV[5])
  redis.call('ZADD', KEYS[5], due, h[8])
  return {'resend', h[6], h[7]}
end
if lease > t then
  redis.call('ZADD', KEYS[5], lease, h[8])
  return {'alive', h[6], h[7]}
end
if state == 'CANCELLING' then
  move(state, 'CANCELLED', cjson.encode({state = 'CANCELLED'}), now, retention,
       {'finished_at', now})
  return {'cancelled', h[6], h[7]}
end
local due = t + tonumber(ARGV[4])
if dispatching then
  redis.call('HSET', KEYS[1], 'lease_until', tostring(due), 'dispatch', ARGV[5])
  redis.call('ZADD', KEYS[5], due, h[8])
  return {'requeue', h[6], h[7]}
end
local attempt = tonumber(h[2]) or 0
if attempt - (tonumber(h[3]) or 0) >= tonumber(ARGV[2]) then
  local err = {reason = 'WORKER_LOST', message = ARGV[6]}
  move(state, 'FAILED', cjson.encode({state = 'FAILED', error = err}), now, retention,
       {'finished_at', now, 'error_reason', err.reason, 'error_message', err.message})
  return {'failed', h[6], h[7]}
end
log_event(now, 'WARNING', (string.gsub(ARGV[7], '{attempt}', tostring(attempt))))
move(state, 'QUEUED', cjson.encode({state = 'QUEUED', attempt = attempt}), now, retention,
     {'lease_until', tostring(due), 'lease_owner', '', 'dispatch', ARGV[5], 'queued_at', now})
redis.call('ZADD', KEYS[5], due, h[8])
return {'requeue', h[6], h[7]}
"""
)

# The new Celery message of a requeued job was sent. KEYS: job hash, leases. ARGV: the
# dispatch token. Clears the dispatch lease unless a worker has started the job already
# (or another dispatch took over).
_DISPATCHED = """
local h = redis.call('HMGET', KEYS[1], 'state', 'dispatch', 'id')
if h[1] ~= 'QUEUED' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'dispatch', '', 'lease_until', '0')
redis.call('ZREM', KEYS[2], h[3])
return 1
"""

# A worker's main process giving up on a child it killed: its lease runs out now, so the
# reaper (or a redelivered message) moves the job on at once. KEYS: job hash, leases.
# ARGV: the owner (host/pid of the child).
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'id')
if h[2] ~= ARGV[1] or (h[1] ~= 'RUNNING' and h[1] ~= 'CANCELLING') then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', '0')
redis.call('ZADD', KEYS[2], 0, h[3])
return 1
"""

# One epoch's record: its history entry and its event, together, once. KEYS: job hash,
# history, events. ARGV: the attempt recording it ("": any), epoch, history entry JSON,
# time, event JSON. Returns 1 (recorded), 0 (recorded already: a retry) or -1 (another
# attempt holds the job now).
_RECORD_EPOCH = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
local last = redis.call('LINDEX', KEYS[2], -1)
if last then
  local ok, entry = pcall(cjson.decode, last)
  if ok and type(entry) == 'table' and tonumber(entry['epoch'])
     and tonumber(entry['epoch']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'type', 'epoch', 'time', ARGV[4],
           'data', ARGV[5])
return 1
"""

# A job record rebuilt after Redis lost it (``service.domain.job_records``), only when no
# record exists. KEYS: job hash, events, statistics, history, leases, index. ARGV:
# retention, state (RUNNING: the worker running it; FAILED: nobody runs it), the log line
# saying what happened, now, lease seconds (RUNNING), id, created_at, the state event JSON,
# then the record's field/value pairs. A RUNNING one gets a lease by Redis's clock and is
# counted running again; a FAILED one is counted finished and expires with the retention.
# Returns 1 (rebuilt) or 0 (a record exists: nothing done).
_REBUILD = (
    _LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local kind = redis.call('HGET', KEYS[1], 'kind')
redis.call('ZADD', KEYS[6], tonumber(ARGV[7]), ARGV[6])
log_event(ARGV[4], 'WARNING', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'type', 'state', 'time', ARGV[4],
           'data', ARGV[8])
if ARGV[2] == 'RUNNING' then
  local until_ = clock() + tonumber(ARGV[5])
  redis.call('HSET', KEYS[1], 'lease_until', tostring(until_))
  redis.call('ZADD', KEYS[5], until_, ARGV[6])
  redis.call('HINCRBY', KEYS[3], 'running:' .. kind, 1)
else
  redis.call('HINCRBY', KEYS[3], 'finished:' .. kind .. ':' .. ARGV[2], 1)
  if ARGV[1] ~= '' then
    for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4]}) do redis.call('EXPIRE', key, ARGV[1]) end
  end
end
return 1
"""
)

RECORD_LOST = "RECORD_LOST"
"""The reason of a job FAILED because Redis lost its record while nobody ran it."""


def lost_record_message(job: Job) -> str:
    """The error of a job recreated FAILED with reason RECORD_LOST."""
    ran = "it had not started" if job.attempt == 0 else f"attempt {job.attempt} was not running"
    return (
        "Redis lost this job's record (its data was flushed, or it restarted without its "
        f"AOF or RDB) while {ran} on any worker; the job was recreated from its folder on "
        "the data disk as FAILED and will not run: submit it again"
    )


def _rebuild_args(retention: int | None, job: Job, message: str, lease_seconds: float) -> list[str]:
    event: dict[str, Any] = {"state": job.state.value, "attempt": job.attempt, "rebuilt": True}
    if job.error_reason:
        event["error"] = {"reason": job.error_reason, "message": job.error_message}
    pairs = [x for kv in _encode(job).items() for x in kv]
    return [
        _retention_arg(retention),
        job.state.value,
        message,
        repr(time.time()),
        repr(lease_seconds),
        job.id,
        repr(job.created_at),
        json.dumps(event),
        *pairs,
    ]


def _rebuild_keys(job_id: str) -> list[str]:
    return [*_transition_keys(job_id), INDEX]


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
        "lease_until": repr(job.lease_until),
        "lease_owner": job.lease_owner,
        "handbacks": str(job.handbacks),
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
        lease_until=float(h.get("lease_until") or 0),
        lease_owner=h.get("lease_owner", ""),
        handbacks=int(h.get("handbacks") or 0),
    )


def _transition_args(
    allowed: list[JobState],
    to: JobState,
    event: dict[str, Any],
    fields: dict[str, str],
    attempt: int | None = None,
) -> list[str]:
    """ARGV of ``_TRANSITION`` after the retention; with ``attempt``, only that attempt
    may make the change (a worker whose lease was lost can no longer finish the job)."""
    pairs = [x for kv in fields.items() for x in kv]
    data = json.dumps({"state": to.value, **event})
    fence = "" if attempt is None else str(attempt)
    allowed_json = json.dumps([s.value for s in allowed])
    return [allowed_json, to.value, data, repr(time.time()), fence, *pairs]


def _transition_keys(job_id: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), STATS, history_key(job_id), LEASES]


def lost_message(max_attempts: int) -> str:
    """The error of a job FAILED because its workers were lost ``max_attempts`` times."""
    return (
        f"the worker running this job was lost {max_attempts} times (killed, or cut off "
        "from Redis for longer than its lease); the job is not retried again"
    )


MIN_DISPATCH_SECONDS = 5.0
"""The shortest dispatch lease: time enough to send a Celery message."""

REQUEUED_MESSAGE = (
    "the worker running attempt {attempt} stopped renewing its lease (the worker was lost, "
    "or cut off from Redis); the job is queued again and resumes from its last backup"
)


RESENT_MESSAGE = (
    "requeued: worker {worker} stopped before starting the job (it had received the "
    "job's message, then its heartbeat ran out); the message is sent again, and no "
    "attempt is counted"
)

DEFAULT_HEARTBEAT_TTL_SECONDS = 15.0
"""How long a worker's heartbeat keys live by default (three 5 s periods)."""


class StartOutcome(enum.StrEnum):
    """What a worker's ``JobStore.start`` found."""

    STARTED = "started"  # RUNNING now, this attempt's
    BUSY = "busy"  # another attempt holds a live lease: this message is a duplicate
    CANCELLED = "cancelled"  # it was cancelled before it could run
    FAILED = "failed"  # out of attempts
    DONE = "done"  # finished already
    GONE = "gone"  # no record (cancelled while queued and expired since)


@dataclass(frozen=True)
class Reaped:
    """What the reaper did with one job whose lease had run out."""

    job_id: str
    outcome: str  # alive, cancelled, failed, requeue, resend, skip
    kind: str = ""
    queue: str = ""


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
        self._reap = client.register_script(_REAP)
        self._dispatched = client.register_script(_DISPATCHED)
        self._rebuild = client.register_script(_REBUILD)
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

    # -- the reaper's side of leases (service.domain.reaper) ---------------------------

    async def due_leases(self, limit: int = 100) -> list[str]:
        """Ids of jobs whose lease has run out by Redis's clock, oldest first."""
        seconds, micros = await self._r.time()
        now = seconds + micros / 1e6
        ids = await self._r.zrangebyscore(LEASES, "-inf", now, start=0, num=limit)
        return [str(i) for i in ids]

    async def reap(
        self,
        job_id: str,
        max_attempts: int,
        dispatch_seconds: float,
        token: str,
        *,
        received_check_seconds: float = DEFAULT_HEARTBEAT_TTL_SECONDS,
        resend_received: bool = True,
    ) -> Reaped:
        """Move on a job whose lease ran out, unless it was renewed meanwhile: CANCELLING ->
        CANCELLED; RUNNING -> QUEUED (outcome ``requeue``: send its Celery message, then
        call ``dispatched``) or FAILED past ``max_attempts`` lost attempts; a requeued job
        whose message was never confirmed sent is ``requeue`` again. A QUEUED job a worker
        received (``JobStore.mark_received``) whose worker process no longer has its alive
        key is ``resend`` (the same, at the same attempt, with a log event saying why),
        unless ``resend_received`` is off; while that worker runs it is looked at again
        ``received_check_seconds`` later."""
        args = [
            _retention_arg(self._retention),
            str(max_attempts),
            repr(time.time()),
            repr(max(dispatch_seconds, MIN_DISPATCH_SECONDS)),
            token,
            lost_message(max_attempts),
            REQUEUED_MESSAGE,
            ALIVE_PREFIX,
            repr(received_check_seconds),
            "1" if resend_received else "0",
            RESENT_MESSAGE,
        ]
        reply = await self._reap(keys=_transition_keys(job_id), args=args)
        outcome, kind, queue = (str(x or "") for x in reply)
        return Reaped(job_id, outcome, kind, queue)

    async def dispatched(self, job_id: str, token: str) -> bool:
        """The Celery message of a requeued job is sent: its dispatch lease is done."""
        return bool(await self._dispatched(keys=[job_key(job_id), LEASES], args=[token]))

    async def states(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """Each job's state, None for those with no record."""
        async with self._r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "state")
            values = await pipe.execute()
        return {
            job_id: None if value is None else JobState(str(value))
            for job_id, value in zip(job_ids, values, strict=True)
        }

    async def mark_lost(self, job: Job) -> bool:
        """Recreate the record of a job Redis lost, which nobody runs, as FAILED with
        reason RECORD_LOST (``job`` as its record file holds it); False when a record
        exists again (its worker rebuilt it, or another reaper did this first)."""
        message = lost_record_message(job)
        job.state, job.finished_at = JobState.FAILED, time.time()
        job.error_reason, job.error_message = RECORD_LOST, message
        job.lease_until, job.lease_owner = 0.0, ""
        args = _rebuild_args(self._retention, job, message, 0.0)
        return bool(await self._rebuild(keys=_rebuild_keys(job.id), args=args))

    async def redis_uptime(self) -> float:
        """Seconds since Redis started (a very large number when INFO is refused)."""
        try:
            info = await self._r.info("server")
        except redis.ResponseError:
            return float("inf")
        return float(info.get("uptime_in_seconds", float("inf")))

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


_T = TypeVar("_T")
DEFAULT_LEASE_SECONDS = 30.0


class JobStore:
    """The worker's view of jobs: start, renew the lease, report progress, finish.

    ``retention_seconds``: how long a job's records outlive its finish (None: for ever).
    ``hidden``: server folders (the data folder) that no failure or log message a caller
    reads may spell out, each with the words that name it instead; such messages also
    lose traceback lines and source paths (``service.errors.redacted``).
    ``retry_seconds``: how long the calls that move a job on (start, finish, hand back)
    retry while Redis is unreachable (a restart, a network blip) before they give up.

    A job this store started is fenced: its epoch records and state changes are made only
    while the job is still at the attempt this store started, so a worker that lost its
    lease (the job moved on to another attempt) can no longer record or finish it.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_seconds: int | None = None,
        hidden: dict[str, str] | None = None,
        retry_seconds: float = 0.0,
    ) -> None:
        self._r = client
        self._retention = retention_seconds
        self._hidden = dict(hidden or {})
        self._retry_seconds = retry_seconds
        self._attempts: dict[str, int] = {}  # job id -> the attempt this store started
        # job id -> the job this store started, its lease owner and seconds: what rebuilds
        # its record should Redis lose it (``_ensure_record``)
        self._running: dict[str, tuple[Job, str, float]] = {}
        self._transition = client.register_script(_TRANSITION)
        self._start = client.register_script(_START)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._hand_back = client.register_script(_HAND_BACK)
        self._dispatched = client.register_script(_DISPATCHED)
        self._release = client.register_script(_RELEASE)
        self._received = client.register_script(_RECEIVED)
        self._record = client.register_script(_RECORD_EPOCH)
        self._rebuild = client.register_script(_REBUILD)

    def get(self, job_id: str) -> Job:
        """One job, with its history."""
        h = cast(dict[str, str], self._r.hgetall(job_key(job_id)))
        if not h:
            raise NotFound(f"job {shown(job_id)} not found")
        return _decode(h, cast(list[str], self._r.lrange(history_key(job_id), 0, -1)))

    def start(
        self,
        job_id: str,
        max_attempts: int,
        *,
        owner: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        dead_owner: str = "",
    ) -> Job | None:
        """Move a job to RUNNING with the next attempt and a lease held by ``owner``; None
        when it must not run: finished, cancelled, out of attempts (then FAILED), gone, or
        held by another attempt's live lease (a duplicate message). A RUNNING job whose
        lease ran out, or whose lease ``dead_owner`` holds (a process known to be dead),
        is taken over. Only ``max_attempts`` lost attempts count; hand-backs do not."""
        return self.start_outcome(
            job_id, max_attempts, owner=owner, lease_seconds=lease_seconds, dead_owner=dead_owner
        )[1]

    def start_outcome(
        self,
        job_id: str,
        max_attempts: int,
        *,
        owner: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        dead_owner: str = "",
    ) -> tuple[StartOutcome, Job | None]:
        """``start``, also saying what it found."""
        now = repr(time.time())
        args = [
            _retention_arg(self._retention),
            str(max_attempts),
            repr(lease_seconds),
            owner,
            now,
            dead_owner,
            lost_message(max_attempts),
        ]
        reply = self._retrying(lambda: self._start(keys=_transition_keys(job_id), args=args))
        outcome, attempt = StartOutcome(str(reply[0])), int(reply[1])
        if outcome is not StartOutcome.STARTED:
            return outcome, None
        self._attempts[job_id] = attempt
        job = self._retrying(lambda: self.get(job_id))
        self._running[job_id] = (job, owner, lease_seconds)
        return outcome, job

    def mark_received(self, job_id: str, worker: str, check_after: float) -> bool:
        """A worker's main process (``worker``: hostname/pid) has received the job's
        message: a QUEUED job is marked received by it, and the reaper looks after
        ``check_after`` seconds whether that worker still runs (False: not QUEUED)."""
        keys, args = [job_key(job_id), LEASES], [worker, repr(check_after)]
        return bool(self._received(keys=keys, args=args))

    def forget(self, job_id: str) -> None:
        """This worker is done with the job (its fence is dropped)."""
        self._attempts.pop(job_id, None)
        self._running.pop(job_id, None)

    def _ensure_record(self, job_id: str) -> bool:
        """Rebuild the record of the job this store started when Redis has lost it (a
        FLUSHALL, a Redis restarted without its data): RUNNING at this store's attempt and
        lease, from the job as it started, with a log event saying so. True when it
        rebuilt it; False when a record exists, or this store did not start the job."""
        if job_id not in self._running:
            return False
        started, owner, lease_seconds = self._running[job_id]
        job = Job(**{**started.__dict__, "history": []})
        job.state, job.lease_owner = JobState.RUNNING, owner
        job.metrics, job.model_version, job.error_reason, job.error_message = {}, 0, "", ""
        message = (
            f"the job's record was lost (Redis lost its data); the worker running attempt "
            f"{job.attempt} rebuilt it and goes on: epochs before now are not in its history"
        )
        args = _rebuild_args(self._retention, job, message, lease_seconds)
        rebuilt = bool(self._rebuild(keys=_rebuild_keys(job_id), args=args))
        if rebuilt:
            log.warning("job %s: its record was gone from Redis; rebuilt it (RUNNING)", job_id)
        return rebuilt

    def lease_owner(self, job_id: str) -> str:
        """Who holds the job's lease ("": nobody)."""
        return str(self._r.hget(job_key(job_id), "lease_owner") or "")

    def heartbeat(
        self, job_id: str, attempt: int, owner: str, lease_seconds: float
    ) -> JobState | None:
        """Renew the lease ``attempt`` holds for ``lease_seconds`` more; the job's state
        (RUNNING or CANCELLING; a finished state once this attempt finished it, with no
        lease left to renew), or None when the lease is not this attempt's any more."""
        args = [str(attempt), owner, repr(lease_seconds)]
        result = str(self._heartbeat(keys=[job_key(job_id), LEASES], args=args))
        if result == "!gone" and self._ensure_record(job_id):
            result = str(self._heartbeat(keys=[job_key(job_id), LEASES], args=args))
        return None if result.startswith("!") else JobState(result)

    def hand_back(
        self, job_id: str, owner: str, reason: str, dispatch_seconds: float
    ) -> tuple[str, str]:
        """Give back the attempt this store started (a worker stopping): RUNNING -> QUEUED,
        not counted as a lost attempt; CANCELLING -> CANCELLED. Returns the outcome
        (queued, cancelled or lost) and the dispatch token: with ``queued``, send the
        job's Celery message, then call ``dispatched`` (else the reaper sends it after
        ``dispatch_seconds``)."""
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return "lost", ""
        token = uuid.uuid4().hex
        message = (
            f"attempt {attempt} was handed back: {reason}; the job resumes from its last backup"
        )
        args = [
            _retention_arg(self._retention),
            str(attempt),
            owner,
            repr(time.time()),
            repr(max(dispatch_seconds, MIN_DISPATCH_SECONDS)),
            token,
            message,
        ]
        result = self._retrying(lambda: self._hand_back(keys=_transition_keys(job_id), args=args))
        return str(result), token

    def dispatched(self, job_id: str, token: str) -> bool:
        """The Celery message of a job handed back is sent."""
        args = [token]
        return bool(
            self._retrying(lambda: self._dispatched(keys=[job_key(job_id), LEASES], args=args))
        )

    def release(self, job_id: str, owner: str) -> bool:
        """End ``owner``'s lease on the job now (its process was killed), so it moves on
        without waiting for the lease to run out."""
        return bool(self._release(keys=[job_key(job_id), LEASES], args=[owner]))

    def state(self, job_id: str) -> JobState:
        """The current state (the worker polls it for cancellation)."""
        value = self._r.hget(job_key(job_id), "state")
        if value is None and self._ensure_record(job_id):
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

    def record_epoch(self, job_id: str, epoch: int, epochs: int, logs: dict[str, float]) -> bool:
        """Store an epoch's logs in the history and stream them, both at once and once (a
        retry after a lost reply records nothing more). False when the job has moved on
        to another attempt than the one this store started (nothing recorded)."""
        attempt = self._attempts.get(job_id)
        args = [
            "" if attempt is None else str(attempt),
            str(epoch),
            json.dumps({"epoch": epoch, "logs": logs}),
            repr(time.time()),
            json.dumps({"epoch": epoch, "epochs": epochs, "logs": logs}),
        ]
        keys = [job_key(job_id), history_key(job_id), events_key(job_id)]
        result = int(self._record(keys=keys, args=args))
        if result < 0 and not self._r.exists(job_key(job_id)) and self._ensure_record(job_id):
            result = int(self._record(keys=keys, args=args))
        return result >= 0

    def history_length(self, job_id: str) -> int:
        """Epochs in the job's history."""
        return int(self._r.llen(history_key(job_id)))

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
        args = self._args(job_id, [JobState.RUNNING], JobState.SUCCEEDED, event, fields)
        return self._run(job_id, args) is not None

    def cancelled(self, job_id: str) -> bool:
        """CANCELLING -> CANCELLED once the worker has stopped."""
        allowed = [JobState.CANCELLING, JobState.RUNNING]
        args = self._args(job_id, allowed, JobState.CANCELLED, {}, _now_done())
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
        args = self._args(job_id, allowed, JobState.FAILED, event, fields)
        return self._run(job_id, args) is not None

    def _args(
        self,
        job_id: str,
        allowed: list[JobState],
        to: JobState,
        event: dict[str, Any],
        fields: dict[str, str],
    ) -> list[str]:
        """A transition fenced to the attempt this store started, if it started the job."""
        return _transition_args(allowed, to, event, fields, self._attempts.get(job_id))

    def _run(self, job_id: str, args: list[str]) -> JobState | None:
        def call() -> Any:
            return self._transition(
                keys=_transition_keys(job_id), args=[_retention_arg(self._retention), *args]
            )

        try:
            try:
                result = self._retrying(call)
            except redis.ResponseError as exc:
                if "NOTFOUND" not in str(exc) or not self._ensure_record(job_id):
                    raise
                result = self._retrying(call)  # finishing the job whose record it rebuilt
        except redis.ResponseError as exc:
            if "NOTFOUND" in str(exc):
                raise NotFound(f"job {shown(job_id)} not found") from None
            raise
        return _previous_state(str(result))

    def _retrying(self, call: Callable[[], _T]) -> _T:
        """``call``, again while Redis is unreachable, for up to ``retry_seconds``."""
        deadline = time.monotonic() + self._retry_seconds
        pause = 0.2
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _now_done() -> dict[str, str]:
    return {"finished_at": repr(time.time())}
