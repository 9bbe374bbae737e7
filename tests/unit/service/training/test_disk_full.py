"""The storage refusing a write on a worker (ENOSPC, EDQUOT, EFBIG; Python's or
TensorFlow's own file writes): DISK_FULL naming the file from the data folder, never an
absolute path, with the job's staged version and backups removed."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import keras
import pytest
import tensorflow as tf

from service.domain.model_store import ModelStore
from service.errors import DiskFull
from service.training import exporting, failures

NO_SPACE = "No space left on device"


def test_python_and_tensorflow_write_refusals_are_disk_full_not_out_of_memory() -> None:
    tf_error = tf.errors.ResourceExhaustedError(  # what TF raises for ENOSPC
        None, None, f"{{{{function_node SaveV2}}}} /srv/d/models/m/x.tempstate1; {NO_SPACE}"
    )
    for exc in (
        OSError(errno.ENOSPC, NO_SPACE),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EFBIG, "File too large"),
        tf_error,
    ):
        known = failures.classified(exc)
        assert isinstance(known, DiskFull), exc
        assert failures.reason_of(known) == "DISK_FULL"
        assert "/srv" not in known.message  # no data folder known: no path at all
        assert "submit the job again" in known.message


def test_the_file_is_named_from_the_data_folder_and_only_from_there(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inside = OSError(errno.ENOSPC, NO_SPACE, str(data / "jobs" / "j" / "backup" / "w.h5"))
    outside = OSError(errno.ENOSPC, NO_SPACE, "/tmp/__autograph_generated_file.py")
    h5py_style = OSError(
        f"Unable to create file (name = '{data}/jobs/j/a.h5', errno = 28, "
        f"error message = '{NO_SPACE}')"
    )

    assert "writing <data folder>/jobs/j/backup/w.h5 (No space left on device)" in (
        _message(failures.disk_full(inside, data))
    )
    assert "/tmp" not in _message(failures.disk_full(outside, data))
    assert "<data folder>/jobs/j/a.h5" in _message(failures.disk_full(h5py_style, data))
    unnamed = failures.disk_full(OSError(errno.ENOSPC, NO_SPACE), data, data / "models" / "m")
    assert "writing <data folder>/models/m " in _message(unnamed)
    big = failures.disk_full(OSError(errno.EFBIG, "File too large"), data)
    assert "ulimit -f" in _message(big)
    assert failures.disk_full(ValueError("no"), data) is None


def test_a_full_disk_during_export_leaves_no_staged_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = keras.Sequential([keras.Input((3,), name="x"), keras.layers.Dense(2)])
    store = ModelStore(tmp_path / "data" / "models")

    def full(self: Any, path: str, **_: Any) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(keras.Model, "save", full)
    with pytest.raises(DiskFull) as caught:
        exporting.export_version(model, store, "m", "job1", {"metrics": {}})

    assert caught.value.message.startswith(
        "the worker's storage refused more data while writing "
        "<data folder>/models/m/.staging/job1/model.keras (No space left on device)"
    )
    assert str(tmp_path) not in caught.value.message
    assert list((store.root / "m" / ".staging").iterdir()) == []
    assert store.versions("m") == []
    monkeypatch.undo()  # space freed: the same job exports
    assert exporting.export_version(model, store, "m", "job1", {"metrics": {}}) == 1


class _Ws:
    """The parts of a Workspace that frees_space_when_full reads."""

    def __init__(self, data: Path) -> None:
        self.models = ModelStore(data / "models")
        self.jobs_dir = data / "jobs"


class _Job:
    id = "job1"


def _run_failing(data: Path, exc: Exception) -> BaseException:
    job_dir = data / "jobs" / "job1"
    for folder in ("backup", "backup-phase2", "checkpoints"):
        (job_dir / folder).mkdir(parents=True, exist_ok=True)
        (job_dir / folder / "f").write_bytes(b"x" * 1000)

    @failures.frees_space_when_full
    def run(job: Any, spec: Any, ws: Any) -> None:
        raise exc

    try:
        run(_Job(), None, _Ws(data))
    except Exception as raised:
        return raised
    raise AssertionError("the run did not fail")


def test_a_job_failing_of_a_full_disk_loses_its_backups_and_keeps_its_artifacts(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    tf_error = tf.errors.ResourceExhaustedError(
        None, None, f"{data}/jobs/job1/backup/latest.weights.h5; {NO_SPACE} [Op:SaveV2]"
    )

    raised = _run_failing(data, tf_error)

    assert isinstance(raised, DiskFull)
    assert "writing <data folder>/jobs/job1/backup/latest.weights.h5" in raised.message
    assert sorted(p.name for p in (data / "jobs" / "job1").iterdir()) == ["checkpoints"]


def test_any_other_failure_keeps_the_backups_for_a_redelivery(tmp_path: Path) -> None:
    raised = _run_failing(tmp_path / "data", RuntimeError("worker shutting down"))

    assert isinstance(raised, RuntimeError)
    assert (tmp_path / "data" / "jobs" / "job1" / "backup").is_dir()


def _message(error: DiskFull | None) -> str:
    assert error is not None
    return error.message
