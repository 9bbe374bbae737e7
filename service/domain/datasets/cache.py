"""Local copies of Dataset.save folders at a URL, in the worker's dataset cache folder.

``tf.data.Dataset.load`` reads only through TensorFlow's filesystems, so a folder at an
fsspec URL is copied first, once per URL and listing::

    <cache_dir>/<hash of the URL>/<hash of the listing>/    a complete copy
    <cache_dir>/<hash of the URL>/.<listing>-<random>/      a copy being written

A copy is written to a temporary folder and renamed into place, so a half copy is never
used, and a worker that loses the race to another uses the winner's. Each file must
arrive with the size its listing gave: a read cut short is not taken for the data.

Copies do not pile up: taking a copy of a URL deletes the other copies of that URL, and
temporary folders older than ``STALE_SECONDS`` anywhere in the cache (a killed worker's).
A copy someone still reads is kept: a worker process holds a shared ``flock`` on the copy
it writes or reads until it next takes a copy of the same URL (or exits), and a folder is
deleted only under an exclusive one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.domain.datasets.sources import StoredFile, UriSource, storage_errors
from service.errors import FitserveError, InvalidRequest, Unavailable

COPY_CHUNK = 4 * 1024 * 1024
STALE_SECONDS = 3600  # a temporary folder this old, and unlocked, was left by a dead worker
_HELD: dict[Path, int] = {}  # URL folder -> locked descriptor of the copy this process uses


def local_copy(source: UriSource, cache_dir: Path) -> Path:
    """A local folder with the source's files: the folder itself when local, else the
    copy of this listing under ``cache_dir``, made when there is none."""
    if source.local:
        return Path(source.path)
    names = [_relative(source, f) for f in source.files]
    listing = "".join(
        f"\n{n}\t{f.size}\t{f.version}" for n, f in zip(names, source.files, strict=True)
    )
    dest = cache_dir / _digest(source.uri) / _digest(source.uri + listing)
    with _cache_writes(source.uri, cache_dir):
        held = _hold(dest)
        if held is None:
            held = _make(source, names, dest)
        _keep(dest.parent, held)
        _sweep(cache_dir, dest)
    return dest


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _cache_writes(uri: str, cache_dir: Path) -> Iterator[None]:
    """Local failures (a full disk) name the cache folder: the storage was read fine."""
    try:
        yield
    except FitserveError:
        raise
    except OSError as exc:
        raise Unavailable(
            f"dataset.uri {uri!r} could not be copied: the worker's dataset cache folder "
            f"{cache_dir} could not be written ({exc.strerror or exc}); free space there, or "
            "give the workers a data_dir (FITSERVE_DATA_DIR) with room for the copy"
        ) from None


def _hold(folder: Path) -> int | None:
    """A descriptor with a shared lock on the complete copy at ``folder``; None if none."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a sweeper moves the folder aside
    if not _still_at(fd, folder):
        os.close(fd)
        return None
    return fd


def _still_at(fd: int, folder: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(folder))
    except FileNotFoundError:
        return False


def _make(source: UriSource, names: list[str], dest: Path) -> int:
    """Copy into a locked temporary folder, then rename it into place (the lock moves
    with it); a descriptor that holds the copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        for name, file in zip(names, source.files, strict=True):
            _copy(source, file, tmp / name)
        tmp.rename(dest)
        return fd
    except BaseException as exc:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        winner = _hold(dest) if isinstance(exc, OSError) else None  # another worker's
        if winner is None:
            raise
        return winner


def _copy(source: UriSource, file: StoredFile, target: Path) -> None:
    """One file: its storage's failures name the file, the caller maps local ones."""
    url = source.url(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(url, "file"):
        stream = source.open(file)
    copied = 0
    with stream, target.open("wb") as out:
        while chunk := _read(stream, url):
            out.write(chunk)
            copied += len(chunk)
    if copied != file.size:
        raise Unavailable(
            f"dataset.uri {source.uri!r}: {url!r} gave {copied} bytes where its storage "
            f"listed {file.size} (changed, or the read was cut short); nothing was cached, "
            "retry the job"
        )


def _read(stream: BinaryIO, url: str) -> bytes:
    with storage_errors(url, "file"):
        return stream.read(COPY_CHUNK)


def _keep(url_folder: Path, fd: int) -> None:
    """Hold ``fd`` for the URL, letting go of the copy this process held before."""
    old = _HELD.get(url_folder)
    _HELD[url_folder] = fd
    if old is not None:
        os.close(old)


def _sweep(cache_dir: Path, keep: Path) -> None:
    """Delete the other copies of ``keep``'s URL and stale temporary folders, each
    unless a worker holds it."""
    for entry in keep.parent.iterdir():
        if entry != keep and not entry.name.startswith("."):
            _delete(entry)
    stale = time.time() - STALE_SECONDS
    for entry in (*cache_dir.glob(".*"), *cache_dir.glob("*/.*")):
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < stale:
                _delete(entry)


def _delete(folder: Path) -> None:
    """Delete a folder no one holds; a copy is first renamed aside, so a worker that
    looks it up never finds it half deleted."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _still_at(fd, folder):
            return
        if not folder.name.startswith("."):
            folder = folder.rename(folder.with_name(f".{folder.name}-{uuid.uuid4().hex[:8]}"))
        shutil.rmtree(folder, ignore_errors=True)
    except BlockingIOError:
        pass  # in use
    finally:
        os.close(fd)


def _relative(source: UriSource, file: StoredFile) -> str:
    """A file's path inside the source folder; a listing that points elsewhere (an http
    page linking to ../) is refused rather than copied out of the cache folder."""
    root = source.path.rstrip("/") + "/"
    rel = PurePosixPath(file.name[len(root) :]) if file.name.startswith(root) else None
    if rel is None or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InvalidRequest(
            f"dataset.uri {source.uri!r} lists {source.url(file)!r}, which is not inside "
            "the folder; a Dataset.save folder holds only its own files"
        )
    return str(rel)
