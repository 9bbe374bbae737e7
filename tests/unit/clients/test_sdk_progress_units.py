"""Pure logic of the SDK's progress bar, JobState and Job.plot's missing extra."""

from __future__ import annotations

import io
import sys

import pytest

import fitserve
from fitserve import _progress
from fitserve.v1 import training_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _epoch(epoch: int, epochs: int, **logs: float) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        epoch_ended=training_pb2.EpochEnded(epoch=epoch, epochs=epochs, logs=logs)
    )


def _batch(epoch: int, batch: int, batches: int, **logs: float) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        batch_progress=training_pb2.BatchProgress(
            epoch=epoch, batch=batch, batches=batches, logs=logs
        )
    )


def test_verbose_2_prints_keras_epoch_lines():
    out, clock = io.StringIO(), Clock()
    bar = _progress.ProgressBar(2, epochs=2, stream=out, clock=clock)
    bar.update(_batch(1, 1, 4, loss=1.0))
    clock.now = 2.0
    bar.update(_epoch(1, 2, loss=0.5, accuracy=0.91, val_loss=0.0001))
    bar.close()
    assert out.getvalue() == (
        "Epoch 1/2\n"
        "4/4 - 2s - 500ms/step - accuracy: 0.9100 - loss: 0.5000 - val_loss: 1.0000e-04\n"
    )


def test_verbose_1_off_a_terminal_prints_the_epochs_last_bar_only():
    out, clock = io.StringIO(), Clock()
    bar = _progress.ProgressBar(1, epochs=3, stream=out, clock=clock)
    bar.update(_batch(1, 1, 2, loss=1.0))
    clock.now = 0.02
    bar.update(_epoch(1, 3, loss=0.25))
    assert out.getvalue() == (  # no escape codes in a pipe or a file
        "Epoch 1/3\n2/2 " + "━" * 20 + " 0s 10ms/step - loss: 0.2500\n"
    )


def _at(event: training_pb2.JobEvent, seconds: float) -> training_pb2.JobEvent:
    event.time.FromNanoseconds(int(seconds * 1e9))
    return event


def test_epochs_are_timed_by_the_events_times_when_they_arrive_in_a_burst():
    out, clock = io.StringIO(), Clock()  # the local clock never moves: one burst
    bar = _progress.ProgressBar(2, epochs=2, stream=out, clock=clock)
    running = training_pb2.JobEvent(
        state_changed=training_pb2.StateChanged(state=training_pb2.JOB_STATE_RUNNING)
    )
    bar.update(_at(running, 100.0))
    bar.update(_at(_batch(1, 1, 4, loss=1.0), 100.5))
    bar.update(_at(_epoch(1, 2, loss=0.5), 102.0))  # 2 s after RUNNING
    bar.update(_at(_batch(2, 1, 4, loss=0.4), 102.2))
    bar.update(_at(_epoch(2, 2, loss=0.3), 103.0))  # 1 s after epoch 1 ended
    assert out.getvalue() == (
        "Epoch 1/2\n4/4 - 2s - 500ms/step - loss: 0.5000\n"
        "Epoch 2/2\n4/4 - 1s - 250ms/step - loss: 0.3000\n"
    )


def test_verbose_0_prints_nothing():
    out = io.StringIO()
    bar = _progress.ProgressBar(0, stream=out)
    bar.update(_epoch(1, 1, loss=1.0))
    bar.close()
    assert out.getvalue() == ""


def test_unknown_epoch_totals_show_a_question_mark():
    out = io.StringIO()
    _progress.ProgressBar(2, stream=out).update(_batch(1, 1, 0))
    assert out.getvalue() == "Epoch 1/?\n"


@pytest.mark.parametrize("verbose", [3, -1, "1", True, None])
def test_bad_verbose_values_are_refused(verbose):
    with pytest.raises(ValueError, match=r'verbose must be "auto", 0, 1 or 2'):
        _progress.resolve_verbose(verbose, io.StringIO())


def test_auto_is_quiet_off_a_terminal():
    assert _progress.resolve_verbose("auto", io.StringIO()) == 0


def test_total_epochs_reads_the_stored_request():
    assert _progress.total_epochs('{"fit": {"epochs": 4}, "freeze": {"unfreeze_epochs": 2}}') == 6
    assert _progress.total_epochs("") == 0
    assert _progress.total_epochs("not json") == 0


def test_job_state_spellings():
    state = fitserve.JobState
    assert state.of(training_pb2.JOB_STATE_RUNNING) is state.RUNNING
    assert state.of("job_state_failed") is state.FAILED
    assert state.of("Cancelled") is state.CANCELLED
    assert state.SUCCEEDED == "SUCCEEDED"
    assert state.SUCCEEDED.number == training_pb2.JOB_STATE_SUCCEEDED
    assert state.FAILED.terminal
    assert not state.RUNNING.terminal
    for bad in ("DONE", 99, 2.5, True):
        with pytest.raises(ValueError, match="unknown job state"):
            state.of(bad)  # type: ignore[arg-type]


def test_job_errors_carry_the_state():
    failed = training_pb2.Job(id="j", state=training_pb2.JOB_STATE_FAILED)
    assert fitserve.JobFailedError(failed).state is fitserve.JobState.FAILED
    cancelled = training_pb2.Job(id="j", state=training_pb2.JOB_STATE_CANCELLED)
    assert fitserve.JobCancelledError(cancelled).state == "CANCELLED"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    info = training_pb2.Job(id="j", history=[training_pb2.EpochRecord(epoch=1, logs={"loss": 1.0})])
    job = fitserve.Job(None, info)  # type: ignore[arg-type]  # plot makes no call
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'fitserve\[plot\]'"):
        job.plot(tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_plot_of_a_job_without_epochs_is_refused(tmp_path):
    job = fitserve.Job(None, training_pb2.Job(id="j"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no per-epoch history to plot yet"):
        job.plot(tmp_path / "c.png")
