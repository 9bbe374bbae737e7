"""What of a job's folder is an artifact, and which paths reach one."""

from pathlib import Path

import pytest

from service.domain.job_artifacts import artifact_path, list_artifacts, read_chunks
from service.errors import InvalidRequest, NotFound


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    job = tmp_path / "jobs" / "abc"
    (job / "checkpoints").mkdir(parents=True)
    (job / "backup").mkdir()
    (job / "history.csv").write_text("epoch,loss\n0,1.0\n")
    (job / "checkpoints" / "epoch-0001.keras").write_bytes(b"k" * 10)
    (job / "backup" / "chkpt.weights.h5").write_bytes(b"b")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (job / "link.txt").symlink_to(secret)
    return job


def test_only_the_jobs_own_regular_files_are_listed(job_dir: Path):
    listed = {a.path: a.size_bytes for a in list_artifacts(job_dir)}
    assert listed == {"checkpoints/epoch-0001.keras": 10, "history.csv": 17}


def test_a_job_that_wrote_nothing_has_no_artifacts(tmp_path: Path):
    assert list_artifacts(tmp_path / "never") == []


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("../abc/history.csv", InvalidRequest),
        ("/etc/passwd", InvalidRequest),
        ("backup/chkpt.weights.h5", InvalidRequest),
        ("checkpoints\\epoch-0001.keras", InvalidRequest),
        ("a\x00b", InvalidRequest),
        ("link.txt", NotFound),
        ("checkpoints", NotFound),
        ("missing.csv", NotFound),
    ],
)
def test_paths_outside_or_not_artifacts_are_refused(job_dir: Path, path: str, error: type):
    with pytest.raises(error):
        artifact_path(job_dir, path)


def test_an_artifact_reads_back_in_chunks(job_dir: Path):
    path = artifact_path(job_dir, "checkpoints/epoch-0001.keras")
    assert list(read_chunks(path, 4)) == [b"kkkk", b"kkkk", b"kk"]
