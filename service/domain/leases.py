"""Job leases: how a running job proves its worker is alive, and how it is told to stop.

While an attempt runs, its worker child holds the job's lease (``lease_until`` and
``lease_owner`` in the job's record, and the job in ``fitserve:leases``) and renews it every
third of ``job_lease_seconds`` from a thread (``Heartbeat``), so it keeps beating through
long epochs, data loading and export. Leases are measured by Redis's clock. A lease that
runs out means the worker is gone (killed, its node lost) or cut off from Redis; the
reaper (``service.domain.reaper``, run by every api server) then moves the job on:
CANCELLING -> CANCELLED, RUNNING -> QUEUED with a new Celery message (or FAILED past the
attempt cap). A worker that comes back after its lease was taken finds the job at
another attempt: its heartbeat says so, it stops training at the next batch and leaves
the job alone (``LeaseLost``); its job store's writes are fenced to its own attempt.

A stopping worker (SIGTERM: a rolling restart) hands its attempt back instead
(``HandedBack``): training stops at the next batch end, the job goes back to QUEUED
without counting the attempt as lost, and its new message is sent at once; the next
attempt resumes from the last epoch's backup.

``JobControl`` is what the parts of one running job share: the worker's runtime sets it
(``running``), the training callbacks read it (``current``) to stop the fit, to confirm the
lease before publishing, and to find the job's backup. TF-free: the worker's Celery
shims, runtime and the training callbacks all use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from service.domain.job_store import JobStore
from service.domain.jobs import JobState

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Raised inside a fit (at an epoch end, before that epoch is backed up or recorded)
    when the job must stop without finishing: its worker keeps nothing of the partial
    epoch, and the next attempt redoes it from the last backup."""


class HandedBack(Stopped):
    """The worker is stopping: the attempt is handed back to the queue."""


class LeaseLost(Stopped):
    """Another attempt holds the job now: this worker leaves it alone."""


class JobControl:
    """What the parts of one running job share: why it must stop (if it must), the
    lease's confirmation, and the job's current backup callback."""

    def __init__(self, renew: Callable[[], bool] | None = None) -> None:
        self.reason = ""
        self.lost = False
        self.finished = threading.Event()  # set when the worker is done with the job
        self.backup: Any = None  # the JobBackup of the fit running (service.training)
        self.renew = renew  # renews the lease now; False when it is lost (Heartbeat.confirm)

    def hand_back(self, reason: str) -> None:
        """Stop at the next batch end and give the attempt back (the first reason wins)."""
        if not self.reason:
            self.reason = reason

    def lose(self, reason: str) -> None:
        """The lease is another attempt's: stop at the next batch end, finish nothing."""
        self.lost = True
        self.reason = reason

    @property
    def stopping(self) -> bool:
        return bool(self.reason)

    def stopped(self) -> Stopped:
        """The exception that ends the fit now."""
        return LeaseLost(self.reason) if self.lost else HandedBack(self.reason)

    def confirm(self) -> None:
        """Renew the lease now, before something that must happen once (publishing);
        raise LeaseLost when it is not this attempt's any more."""
        if self.lost or (self.renew is not None and not self.renew()):
            raise LeaseLost(self.reason or "the job's lease is held by another attempt")


_current: JobControl | None = None


def current() -> JobControl | None:
    """The control of the job this process runs (one at a time), if any."""
    return _current


@contextmanager
def running(control: JobControl) -> Iterator[JobControl]:
    """Make ``control`` the current one while the block runs."""
    global _current
    _current = control
    try:
        yield control
    finally:
        _current = None
        control.finished.set()


class Heartbeat:
    """Renews a running attempt's lease every third of the lease, from a daemon thread.

    Redis being unreachable is logged once and retried at the next beat (the lease runs
    on meanwhile: a longer outage ends with the job requeued and this attempt told it lost
    the lease as soon as Redis answers again). A lease found to be another attempt's
    stops the job (``JobControl.lose``).
    """

    def __init__(
        self,
        jobs: JobStore,
        job_id: str,
        attempt: int,
        owner: str,
        lease_seconds: float,
        control: JobControl,
    ) -> None:
        self._jobs, self._job_id, self._attempt = jobs, job_id, attempt
        self._owner, self._lease = owner, lease_seconds
        self._control = control
        self.interval = lease_seconds / 3
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._failing = False

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval + 5)

    def beat(self) -> bool:
        """Renew the lease once; False when there is no lease to renew any more: the job
        finished, or the lease is lost (the control is then told)."""
        state = self._jobs.heartbeat(self._job_id, self._attempt, self._owner, self._lease)
        if state is None:
            if not self._control.lost:
                log.warning("the job's lease is held by another attempt now; stopping")
            self._control.lose(
                f"attempt {self._attempt} lost its lease (the job was requeued while this "
                "worker was cut off)"
            )
            return False
        return state in (JobState.RUNNING, JobState.CANCELLING)

    def confirm(self, within: float = 60.0) -> bool:
        """``beat``, retried while Redis is unreachable for up to ``within`` seconds;
        False when the lease is lost (a finished job counts as confirmed)."""
        deadline = time.monotonic() + within
        while True:
            try:
                return self.beat() or not self._control.lost
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(1.0, self.interval))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                if not self.beat():
                    return
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning("could not renew the job's lease (%s); retrying", exc)
                self._failing = True
                continue
            if self._failing:
                log.info("the job's lease is renewed again")
                self._failing = False
