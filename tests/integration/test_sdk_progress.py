"""The SDK's view of a finished training job, on the session's real server and worker:
the Keras-like progress bar of `Job.wait()` on a real pseudo-terminal and through a pipe,
`verbose=`, `job.history` against the job's events, `job.plot`, and `JobState`."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fitserve
from tests.conftest import RunningServer
from tests.integration.conftest import MLP_LAYERS

EPOCHS = 2
# A child that follows the job as a user's script would: job.wait(), verbose "auto".
WAITER = """
import sys
import fitserve
with fitserve.Client(sys.argv[1], timeout=60) as client:
    verbose = int(sys.argv[3]) if len(sys.argv) > 3 else "auto"
    client.get_job(sys.argv[2]).wait(verbose=verbose)
sys.stderr.write("tensorflow imported: %s" % ("tensorflow" in sys.modules))
"""


@pytest.fixture(scope="module")
def finished(
    server: RunningServer,
    worker: subprocess.Popen[bytes],
    digits: tuple[np.ndarray, np.ndarray],
) -> Iterator[tuple[fitserve.Client, fitserve.Job]]:
    """One small job, two epochs with batch progress and validation, waited for quietly."""
    x, y = digits
    with fitserve.Client(server.target, timeout=120) as client:
        dataset = client.upload_dataset("sdk-progress", x=x[:256], y=y[:256])
        job = client.train(
            "sdk-progress",
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            dataset=dataset,
            epochs=EPOCHS,
            batch_size=64,
            validation_split=0.25,
            callbacks={"batch_progress": True, "batch_progress_interval_seconds": 0.001},
        )
        job.wait(timeout=300, verbose=0)
        yield client, job


def _run_waiter(target: str, job_id: str, *extra: str, tty: bool) -> tuple[str, str]:
    """Run WAITER with stdout on a pseudo-terminal (tty) or a pipe; its stdout, stderr."""
    argv = [sys.executable, "-c", WAITER, target, job_id, *extra]
    if not tty:
        done = subprocess.run(argv, capture_output=True, timeout=120, check=True)
        return done.stdout.decode(), done.stderr.decode()
    primary, secondary = pty.openpty()
    with subprocess.Popen(argv, stdout=secondary, stderr=subprocess.PIPE) as child:
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(primary)
        stderr = child.stderr.read().decode() if child.stderr else ""
        assert child.wait(timeout=120) == 0, stderr
    return b"".join(chunks).decode(), stderr


def test_wait_draws_a_keras_progress_bar_on_a_terminal(finished, server):
    _, job = finished

    out, err = _run_waiter(server.target, job.id, tty=True)

    assert "Epoch 1/2" in out
    assert "Epoch 2/2" in out
    assert out.index("Epoch 1/2") < out.index("Epoch 2/2")
    assert "━" * 5 in out
    assert "/step" in out
    for name in ("accuracy", "loss", "val_accuracy", "val_loss"):
        assert f" - {name}: " in out, out
    assert "\r" in out  # the bar is redrawn in place, batch by batch
    assert "tensorflow imported: False" in err  # the SDK never loads TensorFlow


def test_wait_prints_nothing_through_a_pipe(finished, server):
    _, job = finished

    out, err = _run_waiter(server.target, job.id, tty=False)

    assert out == ""
    assert "tensorflow imported: False" in err  # the child did run to its end


def test_verbose_2_prints_one_line_per_epoch_even_through_a_pipe(finished, server):
    _, job = finished

    out, _ = _run_waiter(server.target, job.id, "2", tty=False)

    lines = out.splitlines()
    assert [line for line in lines if line.startswith("Epoch")] == ["Epoch 1/2", "Epoch 2/2"]
    epoch_lines = [line for line in lines if "/step" in line]
    assert len(epoch_lines) == EPOCHS
    assert all(" - loss: " in line and " - val_accuracy: " in line for line in epoch_lines)
    assert "━" not in out
    assert "\r" not in out


def test_verbose_0_is_silent_and_bad_verbose_is_refused(finished, capsys):
    client, job = finished
    again = client.get_job(job.id)

    again.wait(verbose=0)
    assert capsys.readouterr().out == ""
    again.wait()  # "auto": pytest's captured stdout is not a terminal
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match='verbose must be "auto", 0, 1 or 2'):
        again.wait(verbose=3)  # type: ignore[arg-type]


def test_history_is_the_per_epoch_logs_of_the_jobs_events(finished):
    _, job = finished

    epochs = [e.epoch_ended for e in job.events() if e.WhichOneof("payload") == "epoch_ended"]

    assert [e.epoch for e in epochs] == job.epochs == [1, 2]
    expected = {key: [e.logs[key] for e in epochs] for key in epochs[0].logs}
    assert job.history == expected
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(job.history)
    assert all(isinstance(v, float) for values in job.history.values() for v in values)


def test_plot_writes_the_learning_curves_as_png(finished, tmp_path: Path):
    _, job = finished
    path = tmp_path / "curves.png"

    job.plot(path)

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    with pytest.raises(ValueError, match="history has accuracy"):
        job.plot(tmp_path / "bad.png", metrics=["precision"])
    assert not (tmp_path / "bad.png").exists()


def test_job_state_is_one_str_enum_in_job_list_jobs_and_errors(finished):
    client, job = finished

    assert job.state is fitserve.JobState.SUCCEEDED
    assert job.state == "SUCCEEDED"
    listed = list(client.list_jobs(state=fitserve.JobState.SUCCEEDED, model_name="sdk-progress"))
    assert [j.id for j in listed] == [job.id]
    assert fitserve.JobState.of(listed[0].state) is fitserve.JobState.SUCCEEDED
    assert list(client.list_jobs(state="running", model_name="sdk-progress")) == []
    with pytest.raises(ValueError, match="unknown job state 'DONE'; expected one of QUEUED"):
        client.list_jobs(state="DONE")
