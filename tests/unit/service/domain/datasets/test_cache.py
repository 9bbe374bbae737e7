"""Dataset.save folders at a URL copied into the worker's cache folder: atomically, whole,
once per listing, with old copies and dead workers' temporary folders swept away unless a
worker still holds them. fsspec's in-memory filesystem stands in for an object store."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from service.domain.datasets import cache as dataset_cache
from service.domain.datasets import sources as dataset_sources
from service.domain.datasets.sources import UriFormat
from service.domain.job_specs import DatasetRef
from service.errors import InvalidRequest, NotFound, Unavailable

URI = "memory://bucket/saved"


@pytest.fixture
def memory() -> Iterator[fsspec.AbstractFileSystem]:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/saved/dataset_spec.pb": b"spec", "/bucket/saved/7/0.snapshot": b"data"})
    yield fs
    fs.rm("/bucket", recursive=True)


def listed(uri: str = URI) -> dataset_sources.UriSource:
    return dataset_sources.resolve(DatasetRef(uri=uri), [], ("memory",))


def copy(cache: Path) -> Path:
    return dataset_cache.local_copy(listed(), cache)


def files_under(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_a_saved_folder_at_a_url_is_copied_once(memory: fsspec.AbstractFileSystem, tmp_path: Path):
    cache = tmp_path / "cache"
    first = copy(cache)
    assert (first / "dataset_spec.pb").read_bytes() == b"spec"
    assert (first / "7" / "0.snapshot").read_bytes() == b"data"
    assert copy(cache) == first
    assert list(first.parent.iterdir()) == [first]  # no temporary folder left

    memory.pipe("/bucket/saved/7/0.snapshot", b"rewritten")  # a changed folder: a new copy
    again = copy(cache)
    assert again != first
    assert (again / "7" / "0.snapshot").read_bytes() == b"rewritten"


def test_a_new_copy_replaces_the_old_one(memory: fsspec.AbstractFileSystem, tmp_path: Path):
    cache = tmp_path / "cache"
    first = copy(cache)
    memory.pipe("/bucket/saved/7/0.snapshot", b"rewritten")
    again = copy(cache)
    assert not first.exists()
    assert list(cache.iterdir()) == [again.parent]
    assert list(again.parent.iterdir()) == [again]


def test_an_old_copy_another_worker_reads_is_kept_until_it_lets_go(
    memory: fsspec.AbstractFileSystem, tmp_path: Path
):
    cache = tmp_path / "cache"
    first = copy(cache)
    reader = os.open(first, os.O_RDONLY | os.O_DIRECTORY)  # another worker's job reads it
    fcntl.flock(reader, fcntl.LOCK_SH)
    memory.pipe("/bucket/saved/7/0.snapshot", b"rewritten")
    try:
        again = copy(cache)
        assert (first / "7" / "0.snapshot").read_bytes() == b"data"
    finally:
        os.close(reader)
    assert copy(cache) == again
    assert not first.exists()


def test_temporary_folders_of_dead_workers_are_swept(
    memory: fsspec.AbstractFileSystem, tmp_path: Path
):
    cache = tmp_path / "cache"
    first = copy(cache)
    old = time.time() - dataset_cache.STALE_SECONDS - 60
    stale = [first.parent / f".{first.name}-dead", cache / ".old-layout-dead"]
    for folder in stale:
        (folder / "7").mkdir(parents=True)
        (folder / "7" / "0.snapshot").write_bytes(b"da")
        os.utime(folder, (old, old))
    fresh = first.parent / f".{first.name}-copying"  # a copy being written right now
    fresh.mkdir()
    slow = first.parent / f".{first.name}-slow"  # an hour into a big copy: locked
    slow.mkdir()
    os.utime(slow, (old, old))
    writer = os.open(slow, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(writer, fcntl.LOCK_SH)
    try:
        assert copy(cache) == first
    finally:
        os.close(writer)
    assert [f.exists() for f in stale] == [False, False]
    assert fresh.exists()
    assert slow.exists()


def test_a_read_cut_short_is_never_renamed_into_place(
    memory: fsspec.AbstractFileSystem, tmp_path: Path
):
    source = listed()
    memory.pipe("/bucket/saved/7/0.snapshot", b"da")  # fewer bytes than listed
    with pytest.raises(Unavailable) as info:
        dataset_cache.local_copy(source, tmp_path / "cache")
    assert "'memory:///bucket/saved/7/0.snapshot' gave 2 bytes where its storage listed 4" in (
        info.value.message
    )
    assert files_under(tmp_path / "cache") == []


def test_a_cache_folder_that_cannot_be_written_is_named_not_the_storage(
    memory: fsspec.AbstractFileSystem, tmp_path: Path
):
    memory.pipe(f"/bucket/saved/{'n' * 300}", b"a name too long for a local file")
    cache = tmp_path / "cache"
    with pytest.raises(Unavailable) as info:
        copy(cache)
    message = info.value.message
    assert f"the worker's dataset cache folder {cache} could not be written" in message
    assert "File name too long" in message
    assert "could not be read from its storage" not in message
    assert files_under(cache) == []


def test_a_copy_that_fails_leaves_nothing_behind(memory: fsspec.AbstractFileSystem, tmp_path: Path):
    source = listed()
    memory.rm("/bucket/saved/7/0.snapshot")  # gone between the listing and the copy
    with pytest.raises(NotFound, match=r"memory:///bucket/saved/7/0\.snapshot' does not exist"):
        dataset_cache.local_copy(source, tmp_path / "cache")
    assert files_under(tmp_path / "cache") == []
    assert list((tmp_path / "cache").glob("*/*")) == []


def test_a_local_folder_is_used_in_place(tmp_path: Path):
    source = dataset_sources.UriSource(
        str(tmp_path), UriFormat.SAVED, fsspec.filesystem("file"), str(tmp_path), ()
    )
    assert dataset_cache.local_copy(source, tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_a_listing_that_points_out_of_the_folder_is_refused(tmp_path: Path):
    escaping = dataset_sources.StoredFile("http://h/saved/../../etc/passwd", 1)
    source = dataset_sources.UriSource(
        "http://h/saved", UriFormat.SAVED, fsspec.filesystem("http"), "http://h/saved", (escaping,)
    )
    with pytest.raises(InvalidRequest, match="which is not inside the folder"):
        dataset_cache.local_copy(source, tmp_path / "cache")
    assert not (tmp_path / "etc").exists()
