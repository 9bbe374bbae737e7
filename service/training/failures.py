"""What a job's failure tells its caller (worker side: imports TensorFlow).

A job fails in one of two ways, and ``worker.runtime`` reports each differently:

- a **user error**: a ``FitserveError`` raised by the checks (its class names a reason
  code, such as INVALID_INPUTS or DATASET_UNAVAILABLE), or an exception that
  :func:`classified` recognises: one raised in a plugin's code (PLUGIN_FAILED, naming the
  plugin) or memory running out (OUT_OF_MEMORY). The job fails with that reason and a
  message saying what to change.
- anything else is a **bug**: the job fails INTERNAL with :func:`internal_message`, which
  says nothing of the exception but an error id; the worker logs the traceback with that
  id, so whoever reports the failure can find it.

Either way the message is redacted by the job store (no traceback lines, source paths or
the data folder).
"""

from __future__ import annotations

import uuid

import tensorflow as tf

from service.errors import FitserveError, ResourceExhausted
from service.training.plugins import blame

INTERNAL = "INTERNAL"


class OutOfMemory(ResourceExhausted):
    """The job needed more memory than the worker has."""

    reason = "OUT_OF_MEMORY"


def reason_of(exc: FitserveError) -> str:
    """The reason code a user error reports: its class's ``reason``, else its name."""
    return getattr(exc, "reason", "") or type(exc).__name__.upper()


def classified(exc: BaseException) -> FitserveError | None:
    """The user error an exception that is not a FitserveError stands for; None for a
    bug."""
    if (by_plugin := blame(exc)) is not None:
        return by_plugin
    if isinstance(exc, MemoryError | tf.errors.ResourceExhaustedError):
        return OutOfMemory(
            "the job ran out of memory on the worker; use a smaller fit.batch_size, fewer "
            "or smaller layers, or less data"
        )
    return None


def new_error_id() -> str:
    """An id that finds one failure's traceback in the worker's log."""
    return uuid.uuid4().hex[:16]


def internal_message(error_id: str) -> str:
    """What a job that failed of a bug tells its caller."""
    return (
        f"the job failed with an internal error on the worker; quote error id {error_id} "
        "when reporting it (the worker's log has the details)"
    )
