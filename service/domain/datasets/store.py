"""The dataset store: uploaded .npz files, content-addressed by sha256.

Layout under ``<data_dir>/datasets``::

    blobs/<sha256>.npz      the content, stored once however many names point at it
    blobs/<sha256>.json     its array headers
    names/<name>.json       {"id": "sha256:<hex>", "created_at": ...}
    incoming/               uploads in progress; removed when they fail

An upload becomes visible only after it is complete and valid, by rename; one that fails,
a full disk included (RESOURCE_EXHAUSTED, ``DiskFull``), leaves no file behind. Valid means
also that its arrays hold what their headers declare, and no more than
``max_expanded_bytes`` unpacked (``service.domain.datasets.npz``): a compressed .npz
cannot smuggle a zip bomb past the byte limit of the upload itself.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from service.domain.datasets.npz import ArrayHeader, read_npz_headers
from service.domain.files import read_json, write_json_atomic
from service.domain.resource_names import check_name
from service.errors import (
    DiskFull,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    shown,
    storage_full,
)

ID_PREFIX = "sha256:"
FORMATS = ("npz",)


@dataclass(frozen=True)
class DatasetInfo:
    """What the store knows of one named dataset."""

    id: str
    name: str
    format: str
    size_bytes: int
    arrays: tuple[ArrayHeader, ...]
    num_examples: int
    created_at: float


class DatasetUpload:
    """One upload in progress: bytes go to a private temp file, hashed as they arrive."""

    def __init__(self, store: DatasetStore, name: str, fmt: str, size: int, sha256: str) -> None:
        self._store, self.name, self.format = store, name, fmt
        self._expected_size, self._expected_sha = size, sha256.lower()
        self._hash = hashlib.sha256()
        self._size = 0
        self.path = store.incoming_dir / f"{uuid.uuid4().hex}.part"
        with store.storing():
            store.incoming_dir.mkdir(parents=True, exist_ok=True)
            self._file: BinaryIO = self.path.open("wb")

    def write(self, chunk: bytes) -> None:
        """Append a chunk; refuses to grow past the configured limit."""
        self._size += len(chunk)
        if self._size > self._store.max_bytes:
            raise ResourceExhausted(
                f"dataset is larger than the {self._store.max_bytes} byte limit "
                "(FITSERVE_MAX_DATASET_BYTES)"
            )
        self._hash.update(chunk)
        with self._store.storing():
            self._file.write(chunk)

    def finish(self) -> DatasetInfo:
        """Check, validate and publish the upload; the temp file is gone either way."""
        try:
            with self._store.storing():
                self._file.close()
            digest = self._check_integrity()
            with self._store.storing():
                return self._store._publish(self, digest, self._size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the upload and its temp file."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def _check_integrity(self) -> str:
        if self._size == 0:
            raise InvalidRequest("dataset upload has no content: send the file after the header")
        if self._expected_size and self._expected_size != self._size:
            raise InvalidRequest(
                f"upload ended after {self._size} bytes; the header announced "
                f"{self._expected_size} (interrupted upload?)"
            )
        digest = self._hash.hexdigest()
        if self._expected_sha and self._expected_sha != digest:
            raise InvalidRequest(
                f"content sha256 is {digest}; the header announced {self._expected_sha}"
            )
        return digest


class DatasetStore:
    """Stores and finds datasets; the api writes, workers read paths."""

    def __init__(self, root: Path, max_bytes: int, max_expanded_bytes: int | None = None) -> None:
        """``max_bytes``: the most an upload may send; ``max_expanded_bytes``: the most
        its arrays may hold unpacked (None: as many as ``max_bytes``)."""
        self.root, self.max_bytes = root, max_bytes
        self.max_expanded_bytes = max_bytes if max_expanded_bytes is None else max_expanded_bytes
        self.blobs_dir = root / "blobs"
        self.names_dir = root / "names"
        self.incoming_dir = root / "incoming"

    def begin_upload(self, name: str, fmt: str, size: int = 0, sha256: str = "") -> DatasetUpload:
        """Start an upload after checking the header."""
        check_name(name, "header.name", "dataset name")
        fmt = fmt or "npz"
        if fmt not in FORMATS:
            raise InvalidRequest(
                f"header.format {shown(fmt)} is not supported; expected one of {FORMATS}",
                field="header.format",
            )
        if size < 0:
            raise InvalidRequest(
                f"header.size_bytes is {size}; send the file's size in bytes, or 0 if unknown",
                field="header.size_bytes",
            )
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"dataset of {size} bytes is over the {self.max_bytes} byte limit "
                "(FITSERVE_MAX_DATASET_BYTES)"
            )
        return DatasetUpload(self, name, fmt, size, sha256)

    @contextmanager
    def storing(self) -> Iterator[None]:
        """Turn the disk refusing a write (no space, a quota, the file size limit) into
        DiskFull (RESOURCE_EXHAUSTED), saying so and where, from the data folder."""
        try:
            yield
        except OSError as exc:
            refused = storage_full(exc)
            if refused is None:
                raise
            raise DiskFull(
                f"the server's disk refused the upload while storing it under <data folder>/"
                f"{self.root.name} ({refused[0]}); nothing of it was kept. Free space in the "
                "server's data folder, then upload again"
            ) from exc

    def get(self, ref: str) -> DatasetInfo:
        """A dataset by id (``sha256:<hex>``) or name."""
        if ref.startswith(ID_PREFIX):
            return self._by_id(ref)
        check_name(ref, "dataset", "dataset name")
        path = self.names_dir / f"{ref}.json"
        if not path.exists():
            raise NotFound(f"dataset {ref!r} not found; upload it with UploadDataset")
        entry = read_json(path)
        return self._info(entry["id"], ref, entry["created_at"])

    def list(self) -> list[DatasetInfo]:
        """Every named dataset, newest first."""
        infos = []
        for path in self.names_dir.glob("*.json"):
            entry = read_json(path)
            infos.append(self._info(entry["id"], path.stem, entry["created_at"]))
        return sorted(infos, key=lambda d: (-d.created_at, d.name))

    def delete(self, ref: str) -> None:
        """Remove a name (or every name of an id); content goes when no name is left."""
        if ref.startswith(ID_PREFIX):
            _check_id(ref)
        targets = (
            [d.name for d in self.list() if d.id == ref]
            if ref.startswith(ID_PREFIX)
            else [self.get(ref).name]
        )
        if not targets:
            raise NotFound(f"dataset {shown(ref)} not found")
        digest = self.get(targets[0]).id.removeprefix(ID_PREFIX)
        for name in targets:
            (self.names_dir / f"{name}.json").unlink(missing_ok=True)
        if not any(d.id == ID_PREFIX + digest for d in self.list()):
            (self.blobs_dir / f"{digest}.npz").unlink(missing_ok=True)
            (self.blobs_dir / f"{digest}.json").unlink(missing_ok=True)

    def path(self, dataset_id: str) -> Path:
        """The .npz file of a dataset id."""
        return self.blobs_dir / f"{dataset_id.removeprefix(ID_PREFIX)}.npz"

    def _by_id(self, dataset_id: str) -> DatasetInfo:
        digest = _check_id(dataset_id)
        if not (self.blobs_dir / f"{digest}.json").exists():
            raise NotFound(f"dataset {dataset_id!r} not found")
        names = [d for d in self.list() if d.id == dataset_id]
        return names[0] if names else self._info(dataset_id, "", 0.0)

    def _info(self, dataset_id: str, name: str, created_at: float) -> DatasetInfo:
        meta = read_json(self.blobs_dir / f"{dataset_id.removeprefix(ID_PREFIX)}.json")
        arrays = tuple(
            ArrayHeader(a["name"], a["dtype"], tuple(a["shape"])) for a in meta["arrays"]
        )
        return DatasetInfo(
            id=dataset_id,
            name=name,
            format=meta["format"],
            size_bytes=meta["size_bytes"],
            arrays=arrays,
            num_examples=meta["num_examples"],
            created_at=created_at,
        )

    def _publish(self, upload: DatasetUpload, digest: str, size: int) -> DatasetInfo:
        arrays = read_npz_headers(upload.path, self.max_expanded_bytes)
        num_examples = _check_arrays(arrays)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        blob = self.blobs_dir / f"{digest}.npz"
        meta_path = self.blobs_dir / f"{digest}.json"
        new = not blob.exists()
        meta = {
            "format": upload.format,
            "size_bytes": size,
            "num_examples": num_examples,
            "arrays": [asdict(a) for a in arrays],
        }
        try:
            if new:
                os.replace(upload.path, blob)
            write_json_atomic(meta_path, meta)
            write_json_atomic(
                self.names_dir / f"{upload.name}.json",
                {"id": ID_PREFIX + digest, "created_at": time.time()},
            )
        except BaseException:
            # Content this upload stored and no name points at (the name's file could not
            # be written): gone with it, not kept as an orphan taking space.
            if new and not any(d.id == ID_PREFIX + digest for d in self.list()):
                blob.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
            raise
        return self.get(upload.name)


def _check_id(dataset_id: str) -> str:
    """The hex digest of a well-formed dataset id; INVALID_ARGUMENT for any other."""
    digest = dataset_id.removeprefix(ID_PREFIX)
    if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise InvalidRequest(f"{shown(dataset_id)} is not a dataset id (sha256:<64 hex digits>)")
    return digest


def _check_arrays(arrays: list[ArrayHeader]) -> int:
    """The common number of examples; every array must have the same first dimension."""
    if not arrays:
        raise InvalidRequest("dataset holds no arrays; save 'x' and 'y' with numpy.savez")
    lengths = {a.name: a.shape[0] if a.shape else None for a in arrays}
    if None in lengths.values():
        scalar = next(n for n, v in lengths.items() if v is None)
        raise InvalidRequest(
            f"array {shown(scalar)} is a scalar; every array needs a first (example) dimension"
        )
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{n}: {v}" for n, v in lengths.items())
        raise InvalidRequest(
            f"arrays have different numbers of examples ({detail}); they must match"
        )
    return next(iter(lengths.values())) or 0
