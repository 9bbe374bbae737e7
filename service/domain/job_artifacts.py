"""The files a job writes in its folder on the shared data disk (checkpoints,
TensorBoard logs, history.csv), as callers may list and read them.

Only regular files under the job's folder are artifacts; the BackupAndRestore folders
(fitserve's own, rewritten every epoch) are not. A requested path is resolved and must
stay inside the folder, so ``..`` or a symlink cannot reach other files.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.errors import InvalidRequest, NotFound

INTERNAL_DIRS = frozenset({"backup", "backup-phase2"})
INTERNAL_FILES = frozenset({"job.json"})  # service.domain.job_records.RECORD_FILE
MAX_PATH_CHARS = 1024


@dataclass(frozen=True)
class Artifact:
    path: str  # relative, "/"-separated
    size_bytes: int
    modified_at: float


def list_artifacts(job_dir: Path) -> list[Artifact]:
    """Every artifact of a job, sorted by path; none when it wrote nothing."""
    if not job_dir.is_dir():
        return []
    root = job_dir.resolve()
    found = []
    for path in sorted(job_dir.rglob("*")):
        relative = path.relative_to(job_dir)
        if relative.parts[0] in INTERNAL_DIRS or relative.as_posix() in INTERNAL_FILES:
            continue
        if path.is_symlink() or not path.is_file():
            continue
        if not path.resolve().is_relative_to(root):
            continue
        stat = path.stat()
        found.append(Artifact(relative.as_posix(), stat.st_size, stat.st_mtime))
    return found


def artifact_path(job_dir: Path, path: str) -> Path:
    """The file of one artifact: INVALID_ARGUMENT for a path that is not a plain
    relative one inside the job's folder, NOT_FOUND for one the job did not write."""
    if not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise InvalidRequest(
            "path must be a file path as ListJobArtifacts gives it, e.g. 'history.csv'",
            field="path",
        )
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path:
        raise InvalidRequest(
            f"path {path[:200]!r} must be relative to the job's folder, without '..'",
            field="path",
        )
    if parts[0] in INTERNAL_DIRS or path in INTERNAL_FILES:
        raise InvalidRequest(
            f"path {path[:200]!r} is the job's own backup, not an artifact", field="path"
        )
    full = job_dir / Path(*parts)
    if (
        full.is_symlink()
        or not full.is_file()
        or not full.resolve().is_relative_to(job_dir.resolve())
    ):
        raise NotFound(f"the job has no artifact {path[:200]!r}; ListJobArtifacts lists them")
    return full


def read_chunks(path: Path, chunk_bytes: int) -> Generator[bytes, None, None]:
    """The file's bytes, ``chunk_bytes`` at a time."""
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            yield chunk
