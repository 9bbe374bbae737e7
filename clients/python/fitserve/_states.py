"""`JobState`, the one kind of value a job's state is in the SDK."""

from __future__ import annotations

import enum

from fitserve.v1 import training_pb2

__all__ = ["JobState"]

_PREFIX = "JOB_STATE_"


class JobState(enum.StrEnum):
    """A job's state: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, CANCELLING
    while a running job stops. A `str`, so `JobState.SUCCEEDED == "SUCCEEDED"`.

    `JobState.of(x)` takes any spelling the SDK meets: a `JobState`, a name ("SUCCEEDED",
    "succeeded", "JOB_STATE_SUCCEEDED") or the wire's number (`training_pb2.Job.state`,
    `StateChanged.state`)."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @classmethod
    def of(cls, value: JobState | str | int) -> JobState:
        """The state `value` names; ValueError naming the states for anything else."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                name = training_pb2.JobState.Name(training_pb2.JobState.ValueType(value))
            except ValueError:
                raise ValueError(_unknown(value)) from None
            return cls(name.removeprefix(_PREFIX))
        if isinstance(value, str):
            name = value.strip().upper().removeprefix(_PREFIX)
            if name in cls.__members__:
                return cls[name]
        raise ValueError(_unknown(value))

    @property
    def number(self) -> training_pb2.JobState.ValueType:
        """The wire's number for this state (`training_pb2.JOB_STATE_*`)."""
        return training_pb2.JobState.Value(_PREFIX + self.value)

    @property
    def terminal(self) -> bool:
        """True once the job has ended (SUCCEEDED, FAILED or CANCELLED)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def _unknown(value: object) -> str:
    names = ", ".join(s.value for s in JobState if s is not JobState.UNSPECIFIED)
    return f"unknown job state {value!r}; expected one of {names}"
