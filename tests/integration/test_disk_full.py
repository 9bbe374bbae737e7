"""The disk fills while a job exports its model: the job fails DISK_FULL naming, from the
data folder, the file it was writing; its staged version and its backups are removed; an
upload meanwhile is refused RESOURCE_EXHAUSTED and leaves no file; once space is freed,
the next job and upload succeed.

Before: the job failed INTERNAL ("Errno 28", no path), 12 MB of staging and 7 MB of backup
stayed on the full disk, and the next job and an upload failed too.

How the disk "fills", without filling the machine's disk, in two ways:

- ``file-size-limit`` (any user, Linux): the test sets RLIMIT_FSIZE to 0 on the worker
  process and the server process (prlimit(2)), so their next writes to any file fail for
  real, in Python and in TensorFlow's C++ alike, with EFBIG ("File too large"; Python
  ignores SIGXFSZ), which the service treats like ENOSPC. Freeing space is restoring the
  limit. It exercises every line of the handling; only the errno differs.
- ``full-tmpfs`` (root only, else skipped): the data folder is a 64 MB tmpfs and the
  test fills it with a ballast file, so the writes fail with a real ENOSPC. Freeing space
  is deleting the ballast.

Either way the job is held where its fit has ended and its export begins (the
``outages>PauseBeforeExport`` test callback) while the test fills the disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fitserve
from service.launch.stack import ServerPart, Stack, WorkerPart
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
NAME = "full-disk"
LAYERS = [
    {"type": "Dense", "units": 1024, "activation": "relu", "input_shape": [64]},
    {"type": "Dense", "units": 2, "activation": "softmax"},
]
TMPFS_BYTES = 64 * 1024 * 1024


class FileSizeLimit:
    """A "full disk" for chosen processes: RLIMIT_FSIZE 0, set and restored from here."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[int, int]] = {}

    def fill(self, pids: list[int]) -> None:
        for pid in pids:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            self._saved.setdefault(pid, (soft, hard))
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))

    def free(self) -> None:
        for pid, limits in self._saved.items():
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        self._saved.clear()


class FullTmpfs:
    """A really full disk: the tmpfs holding the data folder, filled with a ballast file."""

    def __init__(self, mount: Path) -> None:
        self.ballast = mount / "ballast"

    def fill(self, pids: list[int]) -> None:
        with self.ballast.open("ab", buffering=0) as file:
            for size in (1024 * 1024, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        file.write(b"\0" * size)
        with pytest.raises(OSError, match="No space left") as refused:
            (self.ballast.parent / "probe").write_bytes(b"x" * 4096)
        assert refused.value.errno == errno.ENOSPC

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)
        (self.ballast.parent / "probe").unlink(missing_ok=True)


Disk = FileSizeLimit | FullTmpfs


@pytest.fixture(params=["file-size-limit", "full-tmpfs"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Disk, Path]]:
    """How the disk fills, and the data folder."""
    data = tmp_path / "data"
    data.mkdir()
    if request.param == "file-size-limit":
        if not hasattr(resource, "prlimit"):
            pytest.skip("prlimit(2) is Linux's")
        yield FileSizeLimit(), data
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(data)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {mounted.stderr.decode().strip()}")
    try:
        yield FullTmpfs(data), data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.fixture
def stack(disk: tuple[Disk, Path], tmp_path: Path) -> Iterator[Stack]:
    """Redis, a server (api and inference) and a worker of this test's own."""
    env = dict(
        os.environ,
        FITSERVE_LOG_FORMAT="text",
        FITSERVE_PLUGINS="tests.plugins.outages",
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    work = tmp_path / "work"
    parts = {"server": ServerPart(), "worker": WorkerPart()}
    with Stack(work, data_dir=disk[1], env=env, cwd=ROOT, **parts) as running:  # type: ignore[arg-type]
        yield running


def _wait_for(path: Path, seconds: float = 180) -> str:
    until = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < until, f"{path.name} did not appear"
        time.sleep(0.1)  # polling a file another process writes
    return path.read_text()


def _arrays(rows: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
    return {"x": x, "y": (x[:, 0] > 0.5).astype(np.int64)}


def _train(client: fitserve.Client, dataset: object, **callbacks: object) -> fitserve.Job:
    return client.train(
        NAME,
        layers=LAYERS,
        loss="sparse_categorical_crossentropy",
        dataset=dataset,  # type: ignore[arg-type]
        epochs=2,
        callbacks=callbacks or None,  # type: ignore[arg-type]
    )


def test_a_disk_full_during_export_fails_disk_full_leaves_nothing_and_recovers(
    disk: tuple[Disk, Path], stack: Stack, tmp_path: Path
) -> None:
    filling, data = disk
    signals = tmp_path / "signals"
    signals.mkdir()
    assert stack.server is not None
    with fitserve.Client(stack.target, timeout=60) as client:
        ds = client.upload_dataset(f"{NAME}-data", **_arrays(256))
        pause = [{"name": "outages>PauseBeforeExport", "folder": str(signals)}]
        job = _train(client, ds, plugins=pause)
        worker_child = int(_wait_for(signals / "paused"))
        job_dir = data / "jobs" / job.id
        assert list(job_dir.glob("backup*"))  # the fit backed itself up

        filling.fill([worker_child])  # the disk fills as the export begins
        (signals / "go").touch()
        with pytest.raises(fitserve.JobFailedError) as failed:
            job.wait(timeout=180)

        error = failed.value.job.error
        assert error.reason == "DISK_FULL"
        staging = f"<data folder>/models/{NAME}/.staging/{job.id}/"
        assert error.message.startswith(
            f"the worker's storage refused more data while writing {staging}"
        ), error.message
        assert error.message.endswith("then submit the job again")
        assert str(data) not in error.message
        assert str(data.resolve()) not in error.message
        assert not list((data / "models" / NAME / ".staging").glob("*"))  # staging removed
        assert not list(job_dir.glob("backup*"))  # so are the failed job's backups
        assert not [p for p in (data / "models" / NAME).iterdir() if p.name.isdigit()]

        blobs = sorted((data / "datasets" / "blobs").iterdir())
        filling.fill([stack.server.pid])  # still full: an upload now
        with pytest.raises(fitserve.ResourceExhaustedError) as refused:
            client.upload_dataset(f"{NAME}-later", **_arrays(2048))
        message = refused.value.details
        assert message.startswith(
            "the server's disk refused the upload while storing it under <data folder>/datasets"
        ), message
        assert "nothing of it was kept" in message
        assert str(data) not in message
        assert list((data / "datasets" / "incoming").iterdir()) == []  # no partial file
        assert sorted((data / "datasets" / "blobs").iterdir()) == blobs
        folders = sorted((data / "jobs").iterdir())
        jobs = [j.id for j in client.list_jobs()]
        with pytest.raises(fitserve.ResourceExhaustedError) as no_job:  # its job.json refused
            _train(client, ds)
        assert no_job.value.details.startswith(
            "could not queue the job: the server's disk refused its record under <data folder>/jobs"
        ), no_job.value.details
        assert "nothing of it was kept" in no_job.value.details
        assert str(data) not in no_job.value.details
        assert sorted((data / "jobs").iterdir()) == folders  # no folder, no record file
        assert [j.id for j in client.list_jobs()] == jobs  # no record in Redis

        filling.free()  # space freed: the service works again
        again = _train(client, ds).wait(timeout=180)
        later = client.upload_dataset(f"{NAME}-later", **_arrays(2048))

    assert again.model_version == 1
    assert later.num_examples == 2048
