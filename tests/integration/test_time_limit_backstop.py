"""The hard backstop of job time limits: a job that cannot stop at its own limit (a
callback that never returns) has its worker child killed by Celery's time_limit, is
FAILED with reason TIME_LIMIT and not redelivered, and the worker goes on with the next job.

This runs on its own Redis, server and worker (not the session's), the worker with a
maximum time limit of 2 s and a grace of 3 s, so the backstop strikes 5 s into the task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fitserve
from tests.conftest import TEST_PLUGINS, private_stack, start_worker, stop_process

pytestmark = pytest.mark.integration
TINY = [{"type": "Dense", "units": 2, "input_shape": [4], "activation": "softmax"}]


def test_a_job_its_time_limit_cannot_stop_is_killed_at_the_hard_limit_and_failed(
    tmp_path: Path,
) -> None:
    with private_stack(tmp_path, plugins=TEST_PLUGINS) as (settings, running):
        worker = start_worker(
            settings,
            tmp_path / "worker.log",
            FITSERVE_JOB_TIME_LIMIT__DEFAULT_SECONDS="2",
            FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS="2",
            FITSERVE_JOB_TIME_LIMIT__BACKSTOP_GRACE_SECONDS="3",
        )
        try:
            with fitserve.Client(running.target, timeout=120) as client:
                x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
                data = client.upload_dataset("backstop", x=x, y=(x[:, 0] > 0.5).astype(int))
                hung = client.train(
                    "backstop-hung",
                    layers=TINY,
                    loss="sparse_categorical_crossentropy",
                    dataset=data,
                    time_limit_seconds=2,
                    callbacks={"plugins": [{"name": "faults>Hang"}]},
                )
                with pytest.raises(fitserve.JobFailedError):
                    hung.wait(timeout=240)
                failed = client.job_record(hung.id)

                after = client.train(
                    "backstop-next",
                    layers=TINY,
                    loss="sparse_categorical_crossentropy",
                    dataset=data,
                )
                after.wait(timeout=240)  # a fresh child took the next job
                again = client.job_record(hung.id)
        finally:
            stop_process(worker)

    assert failed.error.reason == "TIME_LIMIT"
    assert "hard time limit of 5 s" in failed.error.message
    assert "its worker process was killed" in failed.error.message
    assert (again.state, again.attempt) == (failed.state, 1)  # acknowledged, not redelivered
    assert not (settings.models_dir / "backstop-hung").exists()  # nothing published
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Hard time limit (5s) exceeded" in log
