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

It also looks after what Redis losing its data (a FLUSHALL, a restart without its AOF or
RDB) leaves on the data disk (``service.domain.job_records``), at most once a lease: a job
folder whose job has had no record for ``orphan_grace_seconds`` (default: two leases and
two periods, time enough for a live worker to rebuild the record of the job it runs) is
recreated FAILED with reason RECORD_LOST when it holds the job's ``job.json`` (the job was
queued, or its worker is gone too), its backups removed and its artifacts kept until that
record expires; a folder with no ``job.json`` (a finished job whose record is gone, lost
or expired) is removed. A model's staging folder (``models/<name>/.staging/<job>``) whose
job has no record or is finished is removed after the same grace. The ``job.json`` of a
finished job is removed (whoever finished it should have).

Right after Redis restarts, every lease may look run out (Redis was down while the
workers could not renew them), so no pass runs until Redis has been up for a whole lease:
by then every live worker has renewed its lease.

A job can also be stranded before it has a lease: a worker's main process received its
message (Celery's ``task_received``) and was killed before a pool child started the job,
so the message waits in kombu's ``unacked`` hash for the visibility timeout. So the main
process marks the job received by it (``received_by``: its hostname/pid,
``JobStore.mark_received``, ``worker.received``) and puts it in the leases set, due one
heartbeat TTL later; the reaper then looks whether that worker process's alive key
(``service.domain.jobs.alive_key``, renewed with its heartbeat) is still there. While it
is, the job is looked at again at the next pass (a pool child starting the job clears the
mark and takes the lease), so it is sent again within a TTL and a period of the worker's
last heartbeat. Once it is gone, the job's message is sent again, with the same
compare-and-set and dispatch lease as a requeue (one reaper sends it), the attempt
unchanged, and a log event in the job's stream saying which worker stopped before
starting it. A job nobody received is left alone (its queue's alerts are for that). The
old message, should the visibility timeout bring it back, finds the job started or
finished and is dropped (acknowledged) by the worker that gets it. Received jobs are
resent only once Redis has been up for a heartbeat TTL too, so that every live worker
has written its alive key again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from service.domain import job_records
from service.domain.job_store import DEFAULT_HEARTBEAT_TTL_SECONDS, AsyncJobStore, Reaped
from service.domain.jobs import JobState

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
        jobs_dir: Path | None = None,
        models_dir: Path | None = None,
        orphan_grace_seconds: float | None = None,
        heartbeat_ttl_seconds: float = DEFAULT_HEARTBEAT_TTL_SECONDS,
    ) -> None:
        self._jobs, self._send = jobs, send
        self._ttl = heartbeat_ttl_seconds
        self._lease, self._period, self._max_attempts = lease_seconds, period_seconds, max_attempts
        self._failing = False
        self._jobs_dir, self._models_dir = jobs_dir, models_dir
        self._grace = (
            2 * (lease_seconds + period_seconds)
            if orphan_grace_seconds is None
            else orphan_grace_seconds
        )
        self._orphans: dict[Path, float] = {}  # folder -> when it was first seen orphaned
        self._last_sweep = float("-inf")

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
        uptime = await self._jobs.redis_uptime()
        if uptime < self._lease:
            return []  # Redis just came back: leave the workers a lease to renew theirs
        done: list[Reaped] = []
        for job_id in await self._jobs.due_leases(BATCH):
            token = uuid.uuid4().hex
            reaped = await self._jobs.reap(
                job_id,
                self._max_attempts,
                self._lease,
                token,
                # a received job whose worker lives is due again by the next pass (passes
                # are 0.8-1.2 periods apart)
                received_check_seconds=min(self._ttl, 0.5 * self._period),
                # after a Redis restart, workers get a TTL to write their alive keys again
                resend_received=uptime >= self._ttl,
            )
            if reaped.outcome in ("requeue", "resend"):
                await asyncio.to_thread(self._send, reaped.kind, job_id, reaped.queue)
                await self._jobs.dispatched(job_id, token)
            if reaped.outcome in ("failed", "cancelled") and self._jobs_dir is not None:
                await asyncio.to_thread(job_records.remove, self._jobs_dir, job_id)
            if reaped.outcome == "resend":
                log.warning(
                    "job %s: the worker that received it stopped before starting it "
                    "(its heartbeat ran out); its message is sent again",
                    job_id,
                )
            elif reaped.outcome in ("requeue", "failed", "cancelled"):
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
        if time.monotonic() - self._last_sweep >= self._lease:
            self._last_sweep = time.monotonic()
            await self.sweep_orphans()
        return done

    async def sweep_orphans(self) -> list[Orphan]:
        """One look at the job and staging folders (see the module docstring): what it did
        with each folder whose grace had passed."""
        folders = await asyncio.to_thread(_job_folders, self._jobs_dir, self._models_dir)
        states: dict[str, JobState | None] = {}
        ids = sorted({job_id for _, job_id, _ in folders})
        for start in range(0, len(ids), 500):
            states |= await self._jobs.states(ids[start : start + 500])
        now, seen, done = time.monotonic(), set(), []
        for folder, job_id, staging in folders:
            state = states.get(job_id)
            if state is not None and not (staging and state.terminal):
                if state.terminal and (folder / job_records.RECORD_FILE).exists():
                    await asyncio.to_thread(job_records.remove, folder.parent, job_id)
                continue
            seen.add(folder)
            if now - self._orphans.setdefault(folder, now) < self._grace:
                continue
            done.append(await self._orphan(folder, job_id, staging))
            self._orphans.pop(folder, None)
        self._orphans = {f: t for f, t in self._orphans.items() if f in seen}
        return done

    async def _orphan(self, folder: Path, job_id: str, staging: bool) -> Orphan:
        job = None if staging else job_records.read(folder.parent, job_id)
        if job is None:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            log.warning("removed %s: no job record for it (Redis lost or expired it)", folder)
            return Orphan(folder, job_id, "removed")
        marked = await self._jobs.mark_lost(job)
        await asyncio.to_thread(_drop_backups, folder)
        if marked:
            log.warning("job %s: Redis had lost its record; recreated FAILED (RECORD_LOST)", job_id)
        return Orphan(folder, job_id, "record_lost" if marked else "rebuilt")


@dataclass(frozen=True)
class Orphan:
    """What the reaper did with a folder left without a job record."""

    folder: Path
    job_id: str
    outcome: str  # removed, record_lost, rebuilt (a record existed again: nothing done)


def _job_folders(jobs_dir: Path | None, models_dir: Path | None) -> list[tuple[Path, str, bool]]:
    """(folder, job id, is a staging folder) of every job folder and model staging folder."""
    found: list[tuple[Path, str, bool]] = []
    if jobs_dir is not None and jobs_dir.is_dir():
        found += [(p, p.name, False) for p in jobs_dir.iterdir() if _job_id(p)]
    if models_dir is not None and models_dir.is_dir():
        for model in models_dir.iterdir():
            staging = model / ".staging"
            if staging.is_dir():
                found += [(p, p.name, True) for p in staging.iterdir() if _job_id(p)]
    return found


def _job_id(folder: Path) -> bool:
    """Whether a folder is named as a job is (32 hex digits) and is a real folder."""
    name = folder.name
    return (
        len(name) == 32
        and all(c in "0123456789abcdef" for c in name)
        and folder.is_dir()
        and not folder.is_symlink()
    )


def _drop_backups(folder: Path) -> None:
    """A job that will not run again: its record file and backups go, its artifacts stay
    (until its record expires and the folder is removed)."""
    (folder / job_records.RECORD_FILE).unlink(missing_ok=True)
    for backup in folder.glob("backup*"):
        shutil.rmtree(backup, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when nothing else is in it
