"""`Job`, a handle on one server-side job: follow its events, wait for it, cancel it."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Protocol, TypeVar

import grpc

from fitserve._errors import (
    DeadlineExceededError,
    FitserveError,
    JobCancelledError,
    JobFailedError,
    from_rpc_error,
)
from fitserve._progress import ProgressBar, Verbose, resolve_verbose, total_epochs
from fitserve._states import JobState
from fitserve.v1 import training_pb2

__all__ = ["Job", "JobRecord"]

_TERMINAL_STATES = frozenset(
    {
        training_pb2.JOB_STATE_SUCCEEDED,
        training_pb2.JOB_STATE_FAILED,
        training_pb2.JOB_STATE_CANCELLED,
    }
)
_PLOT_EXTRA = (
    "Job.plot needs matplotlib, which the SDK does not install by default: "
    "pip install 'fitserve[plot]'"
)
WATCH_RETRY_SECONDS = 300.0
"""How long, by default, following a job rides out an outage (`Client(watch_retry_seconds=)`)."""

_BACKOFF_SECONDS = 0.2  # the first pause after a failed call
_BACKOFF_MULTIPLIER = 2.0
_BACKOFF_MAX_SECONDS = 5.0  # the longest pause: a server back is found within this
_JITTER = 0.2  # each pause is drawn within +-20% of its step, so watchers spread out
_PUSHBACK_KEY = "grpc-retry-pushback-ms"
_T = TypeVar("_T")


class JobEventStream(Protocol):
    """An open WatchJob stream: iterate it for events, cancel it when done."""

    def __iter__(self) -> Iterator[training_pb2.JobEvent]: ...

    def cancel(self) -> bool: ...


class JobCalls(Protocol):
    """What a `Job` needs of a client: the public job calls of `fitserve.Client`."""

    @property
    def timeout(self) -> float | None: ...

    @property
    def watch_retry_seconds(self) -> float | None: ...

    def job_record(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job: ...

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> training_pb2.Job: ...

    def watch_job(
        self, job_id: str, after_event_id: str = "", *, timeout: float | None = None
    ) -> JobEventStream: ...


class JobRecord:
    """What `Job` and `AsyncJob` read alike from the job record as last fetched: id,
    state, per-epoch history, learning curves."""

    def __init__(self, info: training_pb2.Job) -> None:
        self._info = info
        self._last_event_id = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state}>"

    @property
    def id(self) -> str:
        """The server-assigned job id."""
        return self._info.id

    @property
    def info(self) -> training_pb2.Job:
        """The job record as last fetched."""
        return self._info

    @property
    def state(self) -> JobState:
        """The state as last fetched, e.g. `JobState.RUNNING` (equal to "RUNNING")."""
        return JobState.of(self._info.state)

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

    def plot(self, path: str | os.PathLike[str], *, metrics: Iterable[str] | None = None) -> None:
        """Save the learning curves of ``history`` to ``path`` (PNG, SVG, PDF: by its
        suffix): one panel per metric, its ``val_`` twin on the same panel, as
        ``pd.DataFrame(history.history).plot()`` would draw them. ``metrics`` picks the
        panels (default: every metric but ``val_`` ones and the learning rate). Needs
        the ``fitserve[plot]`` extra (matplotlib); ImportError naming it otherwise;
        ValueError when the job has no epochs yet or a metric is not in its history."""
        history = self.history
        if not history:
            raise ValueError(
                f"job {self.id} has no per-epoch history to plot yet ({self.state}); "
                "wait() for it or refresh() it first"
            )
        names = _panels(history, metrics)
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            from matplotlib import pyplot
        except ImportError as error:
            raise ImportError(_PLOT_EXTRA) from error
        figure, axes = pyplot.subplots(
            1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False
        )
        try:
            for axis, name in zip(axes[0], names, strict=True):
                for key in (name, f"val_{name}"):
                    if key in history:
                        axis.plot(self.epochs, history[key], marker="o", label=key)
                axis.set_title(name)
                axis.set_xlabel("epoch")
                axis.legend()
            figure.suptitle(f"job {self.id} ({self.info.model_name})")
            figure.tight_layout()
            figure.savefig(os.fspath(path))
        finally:
            pyplot.close(figure)

    def _timeout_message(self) -> str:
        return f"job {self.id} did not finish in time; it was {self.state} when last fetched"


class Job(JobRecord):
    """A handle on a server-side job: follow its events, wait for it, or cancel it.

    `info` is the job record as last fetched (`refresh()`, `wait()`, `cancel()`); the
    server holds the truth, so a handle is cheap and many can point at one job.
    """

    def __init__(self, client: JobCalls, info: training_pb2.Job) -> None:
        super().__init__(info)
        self._client = client

    def refresh(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Fetch the job record again, and return it."""
        self._info = self._client.job_record(self.id, timeout=timeout)
        return self._info

    def cancel(self, *, timeout: float | None = None) -> training_pb2.Job:
        """Ask the job to stop; it ends CANCELLED at its next batch end."""
        self._info = self._client.cancel_job(self.id, timeout=timeout)
        return self._info

    def events(
        self, after_event_id: str = "", *, timeout: float | None = None
    ) -> Iterator[training_pb2.JobEvent]:
        """The job's events after `after_event_id` ("" : from the first) until it ends.

        Every event is yielded as the server sent it; its `payload` is one of
        `state_changed`, `epoch_ended`, `batch_progress`, `log` and `threshold` (a
        `ThresholdReached`: a metric of `callbacks={"thresholds": [...]}` reached its
        value at the end of an epoch; with `stopped` set, the fit ends there and the
        job goes on to publish the model as usual).

        An outage (the server restarting, Redis down: UNAVAILABLE) is ridden out: the
        stream is reopened from the last event seen, after pauses that grow 0.2 s, 0.4 s,
        ... up to 5 s (each +-20% at random), so every event comes once and in order.
        Retrying ends after the client's `watch_retry_seconds` (default 300) of failed
        calls with no event between them, raising `UnavailableError`; with `timeout`,
        retrying goes on until `timeout` seconds after the call instead, then
        `TimeoutError`. Errors that retrying cannot cure (NOT_FOUND, INVALID_ARGUMENT,
        PERMISSION_DENIED, UNAUTHENTICATED, ...) raise at once. A quiet stream that
        outlasts the per-call timeout is reopened the same way, so following an
        hours-long job never trips the client's deadline.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._follow(after_event_id, deadline, self._outage(deadline))

    def wait(self, timeout: float | None = None, *, verbose: Verbose = "auto") -> training_pb2.Job:
        """Block until the job ends and return its final record.

        On the way it draws a progress bar on stdout as Keras's `fit(verbose=...)` does:
        "auto" (the default) is 1 on a terminal and 0 otherwise; 0 prints nothing; 1 an
        `Epoch 3/10` line and a bar per epoch (batch by batch when the job was started
        with `callbacks={"batch_progress": True}`), with loss and metrics; 2 one line per
        epoch. Following from a fresh handle replays the epochs already run.

        Raises `JobFailedError` or `JobCancelledError` when it did not succeed, and
        `TimeoutError` when `timeout` seconds pass first (the job keeps running). An
        outage is ridden out as `events()` does, for up to `timeout` when one is given.
        """
        level = resolve_verbose(verbose, sys.stdout)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(level, epochs=total_epochs(self._info.request_json))
        try:
            info = self._wait_until_terminal(deadline, bar.update if level else None)
        except DeadlineExceededError as error:
            if deadline is None or time.monotonic() < deadline:
                raise
            raise TimeoutError(self._timeout_message()) from error
        finally:
            bar.close()
        return _outcome(info)

    def _wait_until_terminal(
        self,
        deadline: float | None,
        on_event: Callable[[training_pb2.JobEvent], None] | None = None,
    ) -> training_pb2.Job:
        outage = self._outage(deadline)
        while True:
            saw_events = self._follow_until_terminal_event(deadline, outage, on_event)
            info = self._retried(lambda: self.refresh(timeout=self._call_timeout(deadline)), outage)
            if info.state in _TERMINAL_STATES:
                return info
            if not saw_events:  # the stream closed early: don't spin on GetJob
                _sleep(_BACKOFF_SECONDS, deadline)

    def _follow_until_terminal_event(
        self,
        deadline: float | None,
        outage: _Outage,
        on_event: Callable[[training_pb2.JobEvent], None] | None = None,
    ) -> bool:
        saw_events = False
        with contextlib.closing(self._follow(self._last_event_id, deadline, outage)) as events:
            for event in events:
                saw_events = True
                if on_event is not None:
                    on_event(event)
                if _is_terminal_event(event):
                    break
        return saw_events

    def _follow(
        self, after_event_id: str, deadline: float | None, outage: _Outage
    ) -> Generator[training_pb2.JobEvent, None, None]:
        while True:
            timeout = self._call_timeout(deadline)
            call = self._client.watch_job(self.id, after_event_id, timeout=timeout)
            try:
                for event in call:
                    after_event_id = self._last_event_id = event.event_id
                    outage.ended()
                    yield event
                return
            except grpc.RpcError as error:
                self._call_timeout(deadline)  # raises TimeoutError once the deadline has passed
                if _status_code(error) == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # only this call's own deadline lapsed: a quiet job, not an outage
                outage.pause_or_raise(error, from_rpc_error(error))
            finally:
                call.cancel()

    def _retried(self, fetch: Callable[[], _T], outage: _Outage) -> _T:
        """``fetch()`` (a unary call, its errors translated), retried through an outage."""
        while True:
            try:
                result = fetch()
            except FitserveError as error:
                outage.pause_or_raise(error.__cause__, error)
                continue
            outage.ended()
            return result

    def _outage(self, deadline: float | None) -> _Outage:
        return _Outage(self._client.watch_retry_seconds, deadline, self._timeout_message)

    def _call_timeout(self, deadline: float | None) -> float | None:
        """The client's per-call timeout, cut to what is left before `deadline`."""
        default = self._client.timeout
        if deadline is None:
            return default
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_message())
        return remaining if default is None else min(default, remaining)


class _Outage:
    """One stretch of failed calls while following a job: the pause before each retry
    (capped exponential backoff with jitter, or the server's own retry hint when longer),
    and when to give up: ``budget`` seconds after the first failure since a call last got
    through, or at the caller's ``deadline`` when there is one."""

    def __init__(
        self, budget: float | None, deadline: float | None, timeout_message: Callable[[], str]
    ) -> None:
        self._budget, self._deadline, self._timeout_message = budget, deadline, timeout_message
        self._started: float | None = None
        self._failures = 0

    def ended(self) -> None:
        """A call got through: the next failure starts a new outage."""
        self._started, self._failures = None, 0

    def pause_or_raise(self, cause: BaseException | None, error: FitserveError) -> None:
        """Sleep before the next try when ``cause`` (the failed call) is worth retrying
        and time is left; else raise ``error`` (TimeoutError once the deadline passed)."""
        _nap(self.next_pause(cause, error))

    def next_pause(self, cause: BaseException | None, error: FitserveError) -> float:
        """The seconds to wait before the next try (``pause_or_raise`` without the sleep,
        for the AsyncJob to await instead)."""
        pause = _retry_pause(cause)
        if pause is None:
            raise error
        now = time.monotonic()
        if self._started is None:
            self._started = now
        give_up = self._give_up_at()
        if give_up is not None and now >= give_up:
            if self._deadline is not None:
                raise TimeoutError(self._timeout_message()) from error
            raise type(error)(
                f"{error.details} (still failing after {now - self._started:.0f} s of retries; "
                "Client(watch_retry_seconds=...) sets how long)",
                code=error.code,
            ) from error
        step = min(_BACKOFF_MAX_SECONDS, _BACKOFF_SECONDS * _BACKOFF_MULTIPLIER**self._failures)
        self._failures += 1
        delay = max(step * random.uniform(1 - _JITTER, 1 + _JITTER), pause)
        return delay if give_up is None else max(0.0, min(delay, give_up - now))

    def _give_up_at(self) -> float | None:
        if self._deadline is not None:
            return self._deadline
        if self._budget is None or self._started is None:
            return None
        return self._started + self._budget


def _retry_pause(error: BaseException | None) -> float | None:
    """The least pause before retrying a failed call, None when retrying cannot help.

    UNAVAILABLE (server unreachable or restarting, Redis down) is retried; so is
    RESOURCE_EXHAUSTED when the server sent a retry hint (gRPC pushback, in ms; a negative
    hint means never). Every other code is the caller's to handle.
    """
    code = _status_code(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return 0.0
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == _PUSHBACK_KEY:
            with contextlib.suppress(ValueError):
                hint = int(value)
                return hint / 1000 if hint >= 0 else None
    return None


def _status_code(error: BaseException | None) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


def _is_terminal_event(event: training_pb2.JobEvent) -> bool:
    return (
        event.WhichOneof("payload") == "state_changed"
        and event.state_changed.state in _TERMINAL_STATES
    )


def _outcome(info: training_pb2.Job) -> training_pb2.Job:
    if info.state == training_pb2.JOB_STATE_FAILED:
        raise JobFailedError(info)
    if info.state == training_pb2.JOB_STATE_CANCELLED:
        raise JobCancelledError(info)
    return info


def _panels(history: dict[str, list[float]], metrics: Iterable[str] | None) -> list[str]:
    """The metrics to draw a panel of: those asked for, or every one but val_ twins
    (drawn with theirs) and the learning rate."""
    if metrics is None:
        names = [
            key
            for key in history
            if key not in ("lr", "learning_rate")
            and not (key.startswith("val_") and key.removeprefix("val_") in history)
        ]
        return names or list(history)
    names = list(metrics)
    missing = [name for name in names if name not in history]
    if missing or not names:
        raise ValueError(
            f"cannot plot {', '.join(map(repr, missing)) or 'no metrics'}: the job's "
            f"history has {', '.join(sorted(history))}"
        )
    return names


def _nap(seconds: float) -> None:
    """The pause between retries (tests replace it)."""
    time.sleep(seconds)


def _sleep(seconds: float, deadline: float | None) -> None:
    if deadline is not None:
        seconds = min(seconds, max(deadline - time.monotonic(), 0.0))
    time.sleep(seconds)
