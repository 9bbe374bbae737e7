"""What a job's failure tells its caller (worker side: imports TensorFlow).

A job fails in one of two ways, and ``worker.runtime`` reports each differently:

- a **user error**: a ``FitserveError`` raised by the checks (its class names a reason
  code, such as INVALID_INPUTS or DATASET_UNAVAILABLE), or an exception that
  :func:`classified` recognises: the storage refusing a write (DISK_FULL), one raised in
  a plugin's code (PLUGIN_FAILED, naming the plugin) or memory running out
  (OUT_OF_MEMORY). The job fails with that reason and a message saying what to change.
- anything else is a **bug**: the job fails INTERNAL with :func:`internal_message`, which
  says nothing of the exception but an error id; the worker logs the traceback with that
  id, so whoever reports the failure can find it.

Either way the message is redacted by the job store (no traceback lines, source paths or
the data folder).

A full disk (or a quota, or the worker's file size limit) must not stay full because of
the job that found it so: :func:`frees_space_when_full` wraps a job kind's run so that
such a job fails DISK_FULL naming, from the data folder, the file it was writing, with its
BackupAndRestore state removed (a failed job never resumes); the export removes its own
staged version (``service.training.exporting``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import tensorflow as tf

from service.domain.jobs import Job
from service.domain.workspace import Workspace
from service.errors import DiskFull, FitserveError, ResourceExhausted, storage_full
from service.training.plugins import blame

log = logging.getLogger(__name__)
INTERNAL = "INTERNAL"
DATA_FOLDER = "<data folder>"
_Spec = TypeVar("_Spec")
# What to do about each refusal, by the system's words for it.
_REMEDIES = {
    os.strerror(errno.ENOSPC): "free space in the data folder",
    os.strerror(errno.EDQUOT): "free space in the data folder or raise the quota",
    os.strerror(errno.EFBIG): "raise the worker's file size limit (ulimit -f) or free space",
}


class OutOfMemory(ResourceExhausted):
    """The job needed more memory than the worker has."""

    reason = "OUT_OF_MEMORY"


def reason_of(exc: FitserveError) -> str:
    """The reason code a user error reports: its class's ``reason``, else its name."""
    return getattr(exc, "reason", "") or type(exc).__name__.upper()


def classified(exc: BaseException) -> FitserveError | None:
    """The user error an exception that is not a FitserveError stands for; None for a
    bug."""
    if (full := disk_full(exc)) is not None:  # before OUT_OF_MEMORY: TF says ENOSPC so too
        return full
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


def disk_full(
    exc: BaseException, data_dir: Path | None = None, writing: Path | None = None
) -> DiskFull | None:
    """The DISK_FULL error that ``exc`` stands for when it is the storage refusing a
    write; None for any other exception. The message names the file (the error's own
    path, else ``writing``) from the data folder, ``<data folder>/models/...``; a path
    outside ``data_dir`` (or any, without it) is never spelled out."""
    if isinstance(exc, DiskFull):
        return exc
    refused = storage_full(exc)
    if refused is None:
        return None
    words, path = refused
    shown = _from_data_folder(Path(path) if path else writing, data_dir)
    what = f"writing {shown}" if shown else "writing to its storage"
    remedy = _REMEDIES.get(words, "free space in the data folder")
    return DiskFull(
        f"the worker's storage refused more data while {what} ({words}); {remedy}, then "
        "submit the job again"
    )


@contextmanager
def writing(path: Path, data_dir: Path) -> Iterator[None]:
    """Turn the storage refusing a write inside the block into DISK_FULL naming
    ``path`` (when the error names no file of its own)."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc, data_dir, path)
        if full is None or full is exc:
            raise
        raise full from exc


def frees_space_when_full(
    run: Callable[[Job, _Spec, Workspace], None],
) -> Callable[[Job, _Spec, Workspace], None]:
    """Wrap a job kind's run: when the storage refuses a write, the job fails DISK_FULL
    (naming the file from the data folder) and its BackupAndRestore folders are removed
    first, since a failed job never resumes from them and they would keep the disk full.
    Any other failure passes through untouched (a job killed mid-fit keeps its backup)."""

    @functools.wraps(run)
    def wrapper(job: Job, spec: _Spec, ws: Workspace) -> None:
        try:
            run(job, spec, ws)
        except Exception as exc:
            full = disk_full(exc, ws.models.root.parent)
            if full is None:
                raise
            remove_backups(ws.jobs_dir / job.id)
            if full is exc:
                raise
            raise full from exc

    return wrapper


def remove_backups(job_dir: Path) -> None:
    """The job's BackupAndRestore folders (``backup``, ``backup-phase2``), removed."""
    for backup in job_dir.glob("backup*"):
        shutil.rmtree(backup, ignore_errors=True)
    log.info("removed the job's backups: it failed of a full disk and never resumes")


def _from_data_folder(path: Path | None, data_dir: Path | None) -> str:
    """``path`` as ``<data folder>/...``; "" when it is not under ``data_dir``."""
    if path is None or data_dir is None:
        return ""
    for base, target in ((data_dir, path), (data_dir.resolve(), path.resolve())):
        if target.is_relative_to(base):
            relative = target.relative_to(base).as_posix()
            return DATA_FOLDER if relative == "." else f"{DATA_FOLDER}/{relative}"
    return ""
