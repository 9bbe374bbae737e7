"""`Job`, a handle on one server-side job: follow its events, wait for it, cancel it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Generator, Iterator
from typing import Protocol

import grpc

from fitserve._errors import (
    DeadlineExceededError,
    JobCancelledError,
    JobFailedError,
    from_rpc_error,
)
from fitserve.v1 import training_pb2

__all__ = ["Job"]

JobState = training_pb2.JobState

_TERMINAL_STATES = frozenset(
    {JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED}
)
_WATCH_RETRIES = 5
_WATCH_BACKOFF_SECONDS = 0.2
_WATCH_BACKOFF_MAX_SECONDS = 5.0


class JobEventStream(Protocol):
    """An open WatchJob stream: iterate it for events, cancel it when done."""

    def __iter__(self) -> Iterator[training_pb2.JobEvent]: ...

    def cancel(self) -> bool: ...


class JobCalls(Protocol):
    """What a `Job` needs of a client: the public job calls of `fitserve.Client`."""

    @property
    def timeout(self) -> float | None: ...

    def job_record(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job: ...

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job: ...

    def watch_job(
        self, job_id: str, after_event_id: str = "", *, timeout: float | None = None
    ) -> JobEventStream: ...


class Job:
    """A handle on a server-side job: follow its events, wait for it, or cancel it.

    `info` is the job record as last fetched (`refresh()`, `wait()`, `cancel()`); the
    server holds the truth, so a handle is cheap and many can point at one job.
    """

    def __init__(self, client: JobCalls, info: training_pb2.Job) -> None:
        self._client = client
        self._info = info
        self._last_event_id = ""

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state}>"

    @property
    def id(self) -> str:
        """The server-assigned job id."""
        return self._info.id

    @property
    def info(self) -> training_pb2.Job:
        """The job record as last fetched."""
        return self._info

    @property
    def state(self) -> str:
        """The state as last fetched, e.g. "RUNNING" or "SUCCEEDED"."""
        return JobState.Name(self._info.state).removeprefix("JOB_STATE_")

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-epoch metrics as Keras's ``History.history`` has them: each metric's values,
        one per epoch, from the record as last fetched (``wait()`` and ``refresh()`` fetch
        it). A metric missing from an epoch's logs (a callback may log one only some
        epochs) is NaN there, so every list lines up with ``epochs``."""
        records = self._info.history
        keys = sorted({key for record in records for key in record.logs})
        return {key: [record.logs.get(key, math.nan) for record in records] for key in keys}

    @property
    def epochs(self) -> list[int]:
        """The epoch numbers (1-based) that ``history`` holds, as ``History.epoch`` does
        (0-based there)."""
        return [record.epoch for record in self._info.history]

    def refresh(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Fetch the job record again, and return it."""
        self._info = self._client.job_record(self.id, timeout=timeout)
        return self._info

    def cancel(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Ask the job to stop; it ends CANCELLED at its next batch end."""
        self._info = self._client.cancel_job(self.id, timeout=timeout)
        return self._info

    def events(self, after_event_id: str = "") -> Iterator[training_pb2.JobEvent]:
        """The job's events after `after_event_id` ("" : from the first) until it ends.

        Every event is yielded as the server sent it; its `payload` is one of
        `state_changed`, `epoch_ended`, `batch_progress`, `log` and `threshold` (a
        `ThresholdReached`: a metric of `callbacks={"thresholds": [...]}` reached its
        value at the end of an epoch; with `stopped` set, the fit ends there and the
        job goes on to publish the model as usual).

        A dropped connection is resumed transparently from the last event seen, with
        bounded retries and backoff; only a lasting outage raises `UnavailableError`.
        A quiet stream that outlasts the per-call timeout is reopened the same way, so
        following an hours-long job never trips the client's deadline.
        """
        return self._follow(after_event_id, deadline=None)

    def wait(self, timeout: float | None = None) -> training_pb2.Job:
        """Block until the job ends and return its final record.

        Raises `JobFailedError` or `JobCancelledError` when it did not succeed, and
        `TimeoutError` when `timeout` seconds pass first (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            info = self._wait_until_terminal(deadline)
        except DeadlineExceededError as error:
            if deadline is None or time.monotonic() < deadline:
                raise
            raise TimeoutError(self._timeout_message()) from error
        return _outcome(info)

    def _wait_until_terminal(self, deadline: float | None) -> training_pb2.Job:
        while True:
            saw_events = self._follow_until_terminal_event(deadline)
            info = self.refresh(timeout=self._call_timeout(deadline))
            if info.state in _TERMINAL_STATES:
                return info
            if not saw_events:  # the stream closed early: don't spin on GetJob
                _sleep(_WATCH_BACKOFF_SECONDS, deadline)

    def _follow_until_terminal_event(self, deadline: float | None) -> bool:
        saw_events = False
        with contextlib.closing(self._follow(self._last_event_id, deadline)) as events:
            for event in events:
                saw_events = True
                if _is_terminal_event(event):
                    break
        return saw_events

    def _follow(
        self, after_event_id: str, deadline: float | None
    ) -> Generator[training_pb2.JobEvent, None, None]:
        failures = 0
        while True:
            timeout = self._call_timeout(deadline)
            call = self._client.watch_job(self.id, after_event_id, timeout=timeout)
            try:
                for event in call:
                    after_event_id = self._last_event_id = event.event_id
                    failures = 0
                    yield event
                return
            except grpc.RpcError as error:
                failures = self._retry_or_raise(error, failures, deadline)
            finally:
                call.cancel()

    def _retry_or_raise(self, error: grpc.RpcError, failures: int, deadline: float | None) -> int:
        """Count one more failed watch, or raise when it should not be retried."""
        self._call_timeout(deadline)  # raises TimeoutError once the deadline has passed
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return failures  # only this call's own deadline lapsed: a quiet job, not an outage
        if code != grpc.StatusCode.UNAVAILABLE or failures >= _WATCH_RETRIES:
            raise from_rpc_error(error) from error
        _sleep(min(_WATCH_BACKOFF_SECONDS * 2**failures, _WATCH_BACKOFF_MAX_SECONDS), deadline)
        return failures + 1

    def _call_timeout(self, deadline: float | None) -> float | None:
        """The client's per-call timeout, cut to what is left before `deadline`."""
        default = self._client.timeout
        if deadline is None:
            return default
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_message())
        return remaining if default is None else min(default, remaining)

    def _timeout_message(self) -> str:
        return f"job {self.id} did not finish in time; it was {self.state} when last fetched"


def _is_terminal_event(event: training_pb2.JobEvent) -> bool:
    return (
        event.WhichOneof("payload") == "state_changed"
        and event.state_changed.state in _TERMINAL_STATES
    )


def _outcome(info: training_pb2.Job) -> training_pb2.Job:
    if info.state == JobState.JOB_STATE_FAILED:
        raise JobFailedError(info)
    if info.state == JobState.JOB_STATE_CANCELLED:
        raise JobCancelledError(info)
    return info


def _sleep(seconds: float, deadline: float | None) -> None:
    if deadline is not None:
        seconds = min(seconds, max(deadline - time.monotonic(), 0.0))
    time.sleep(seconds)
