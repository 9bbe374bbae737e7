"""The job's backup and progress callbacks on real Keras fits: backups written atomically,
restored from the last good one, epochs recorded once and kept while Redis is away, and a
job told to stop raising before its partial epoch is kept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import redis

from service.domain import leases
from service.training.callbacks import METADATA_FILE, WEIGHTS_FILE, JobBackup, JobProgress

X = np.random.default_rng(0).random((64, 4), dtype=np.float32)
Y = (X[:, 0] > 0.5).astype(np.int64)


def model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


class Epochs(keras.callbacks.Callback):  # type: ignore[misc]
    """The 0-based epochs a fit ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.ran.append(epoch)


class Records:
    """A stand-in for the worker's JobStore: what JobProgress recorded; Redis can be
    made unreachable."""

    def __init__(self, history: int = 0) -> None:
        self.epochs: list[int] = list(range(1, history + 1))
        self.down = False

    def record_epoch(self, job_id: str, epoch: int, epochs: int, logs: dict[str, float]) -> bool:
        if self.down:
            raise redis.ConnectionError("Redis is restarting")
        if not self.epochs or self.epochs[-1] < epoch:
            self.epochs.append(epoch)
        return True

    def reset_history(self, job_id: str, keep_epochs: int) -> None:
        del self.epochs[max(keep_epochs, 0) :]

    def history_length(self, job_id: str) -> int:
        return len(self.epochs)


def _fit(
    folder: Path, epochs: int, *, extra: list[Any] | None = None, records: Records | None = None
) -> tuple[keras.Model, Epochs, JobBackup]:
    m, ran = model(), Epochs()
    backup = JobBackup(folder)
    callbacks: list[Any] = [backup, ran, *(extra or [])]
    if records is not None:
        callbacks.insert(0, JobProgress(records, "job", epochs))  # type: ignore[arg-type]
    m.fit(X, Y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)
    return m, ran, backup


def _generations(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("gen-"))


def test_each_epoch_is_a_new_complete_backup_and_the_last_two_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "backup"
    _fit(folder, 4)

    names = _generations(folder)
    assert [n.split("-")[1] for n in names] == ["000003", "000004"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    meta = json.loads((folder / names[-1] / METADATA_FILE).read_text())
    assert meta["epoch"] == 4
    assert meta["weights_bytes"] == (folder / names[-1] / WEIGHTS_FILE).stat().st_size


def test_a_fit_resumes_from_the_backup_and_runs_only_the_epochs_left(tmp_path: Path) -> None:
    folder = tmp_path / "backup"
    first, _ran, _backup = _fit(folder, 3)
    weights = [w.copy() for w in first.get_weights()]

    resumed, ran, backup = _fit(folder, 5)
    assert ran.ran == [3, 4]
    assert backup.restored is not None
    assert backup.restored.epoch == 3
    assert not all(np.allclose(a, b) for a, b in zip(weights, resumed.get_weights(), strict=True))


@pytest.mark.parametrize("damage", ["empty metadata", "corrupt metadata", "damaged weights"])
def test_a_damaged_newest_backup_resumes_from_the_one_before(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "backup"
    _fit(folder, 3)
    newest = folder / _generations(folder)[-1]
    if damage == "empty metadata":
        (newest / METADATA_FILE).write_text("")
    elif damage == "corrupt metadata":
        (newest / METADATA_FILE).write_text('{"epoch": 3, "weights_sha2')
    else:
        with (newest / WEIGHTS_FILE).open("r+b") as f:
            f.seek(100)
            f.write(b"\0" * 64)

    _m, ran, backup = _fit(folder, 5)
    assert ran.ran == [2, 3, 4]  # from epoch 2's backup, not from the start
    assert backup.restored is not None
    assert backup.restored.epoch == 2


def test_keras_s_old_layout_with_an_empty_metadata_file_resumes_from_its_bkp_copy(
    tmp_path: Path,
) -> None:
    """What fitserve wrote before (BackupAndRestore with double_checkpoint), left by a
    worker killed while it rewrote training_metadata.json."""
    folder = tmp_path / "backup"
    m = model()
    m.fit(
        X,
        Y,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                str(folder), double_checkpoint=True, delete_checkpoint=False
            )
        ],
    )
    (folder / "training_metadata.json").write_text("")
    assert json.loads((folder / "training_metadata.json.bkp").read_text())["epoch"] == 2

    _m, ran, backup = _fit(folder, 5)
    assert ran.ran == [2, 3, 4]
    assert backup.restored is not None
    assert backup.restored.name == "training_metadata.json.bkp"
    assert not (folder / "training_metadata.json").exists()  # replaced by the new layout
    assert len(_generations(folder)) == 2


def test_with_no_readable_backup_the_fit_starts_over_with_its_own_initial_weights(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "backup"
    _fit(folder, 2)
    for name in _generations(folder):
        (folder / name / METADATA_FILE).write_text("{}")
    expected = model().get_weights()

    class Initial(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: Any = None) -> None:
            self.weights = [w.copy() for w in self.model.get_weights()]

    initial = Initial()
    _m, ran, backup = _fit(folder, 2, extra=[initial])
    assert ran.ran == [0, 1]
    assert backup.restored is None
    assert all(np.allclose(a, b) for a, b in zip(expected, initial.weights, strict=True))


def test_a_backup_interrupted_mid_write_is_never_read(tmp_path: Path) -> None:
    folder = tmp_path / "backup"
    _fit(folder, 2)
    partial = folder / ".gen-000003-0000000000000000.partial"
    partial.mkdir()
    (partial / WEIGHTS_FILE).write_bytes(b"half a file")
    recent = folder / ".gen-000003-0000000000000001.partial"
    recent.mkdir()
    os.utime(partial, (time.time() - 7200, time.time() - 7200))

    _m, ran, _backup = _fit(folder, 4)
    assert ran.ran == [2, 3]
    assert not partial.exists()  # an hour old: cleaned up by the next backup
    assert recent.exists()  # maybe another writer's, still at it


def test_epochs_are_recorded_once_and_kept_while_redis_is_unreachable(tmp_path: Path) -> None:
    records = Records()

    class Outage(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            records.down = epoch in (1, 2)  # epochs 2 and 3 end while Redis is down

    _fit(tmp_path / "backup", 5, extra=[Outage()], records=records)
    assert records.epochs == [1, 2, 3, 4, 5]


def test_a_job_told_to_stop_keeps_nothing_of_its_partial_epoch(tmp_path: Path) -> None:
    folder = tmp_path / "backup"
    records = Records()
    control = leases.JobControl()

    class StopInEpoch3(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if epoch == 2:
                control.hand_back("the worker is shutting down")
                self.model.stop_training = True

    with leases.running(control), pytest.raises(leases.HandedBack):
        _fit(folder, 5, extra=[StopInEpoch3()], records=records)
    assert records.epochs == [1, 2]
    assert [n.split("-")[1] for n in _generations(folder)] == ["000001", "000002"]

    resumed = Records(history=2)
    with leases.running(leases.JobControl()):
        _m, ran, _backup = _fit(folder, 5, records=resumed)
    assert ran.ran == [2, 3, 4]
    assert resumed.epochs == [1, 2, 3, 4, 5]


def test_an_epoch_backed_up_but_never_recorded_is_recorded_by_the_next_attempt(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "backup"
    records = Records()

    class LostAfterEpoch3(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            records.down = epoch >= 1  # epochs 2 and 3 backed up, never recorded
            if epoch == 3:
                raise KeyboardInterrupt  # the worker dies

    with leases.running(leases.JobControl()), pytest.raises(KeyboardInterrupt):
        _fit(folder, 5, extra=[LostAfterEpoch3()], records=records)
    assert records.epochs == [1]

    records.down = False
    with leases.running(leases.JobControl()):
        _m, ran, _backup = _fit(folder, 5, records=records)
    assert ran.ran == [3, 4]
    assert records.epochs == [1, 2, 3, 4, 5]


def test_backups_are_flushed_to_disk_before_they_are_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])

    def rename(src: Any, dst: Any) -> None:
        synced.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    _fit(tmp_path / "backup", 1)
    assert synced[: synced.index("rename")].count("fsync") == 3  # weights, metadata, folder
    assert synced[synced.index("rename") + 1 :] == ["fsync"]  # the parent folder


def test_a_later_fit_of_the_same_model_starts_where_it_is_told_not_at_a_restored_epoch(
    tmp_path: Path,
) -> None:
    """A fine-tune's second phase: a fit with a backup of its own (none yet) after a first
    fit that resumed from its backup runs from its own initial_epoch."""
    _fit(tmp_path / "phase1", 3)
    m, ran = model(), Epochs()
    m.fit(X, Y, epochs=5, batch_size=16, verbose=0, callbacks=[JobBackup(tmp_path / "phase1")])
    m.fit(
        X,
        Y,
        epochs=8,
        initial_epoch=5,
        batch_size=16,
        verbose=0,
        callbacks=[JobBackup(tmp_path / "phase2"), ran],
    )
    assert ran.ran == [5, 6, 7]
