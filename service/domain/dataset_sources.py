"""Datasets referenced by URI, checked without TensorFlow (the api role imports none).

A ``DatasetRef.uri`` names a folder written by ``tf.data.Dataset.save`` or TFRecord
files (one file, or a folder of them). Only local paths under the configured
``dataset_roots`` are read, so a request cannot make a worker open any file it can
reach; fsspec URLs are refused until they are supported. The api and the worker run the
same check: the api to answer at once, the worker because it is the one that reads.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from service.domain.requests import DatasetRef
from service.errors import InvalidRequest, NotFound

SAVED_SPEC_FILE = "dataset_spec.pb"  # what tf.data.Dataset.save writes first
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")


class UriFormat(enum.StrEnum):
    SAVED = "saved"
    TFRECORD = "tfrecord"


def local_path(uri: str, roots: Sequence[Path], field: str = "dataset.uri") -> Path:
    """The resolved local path of a uri, which must lie under one of ``roots``."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("", "file"):
        raise InvalidRequest(
            f"{field} {uri!r}: {parsed.scheme}:// URLs are not supported yet; copy the data "
            "under one of the dataset_roots (FITSERVE_DATASET_ROOTS) and give its local path",
            field=field,
        )
    raw = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri)
    if not raw.is_absolute():
        raise InvalidRequest(f"{field} {uri!r} must be an absolute path", field=field)
    path = raw.resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise InvalidRequest(
            f"{field} {uri!r} is outside the dataset_roots setting (FITSERVE_DATASET_ROOTS: "
            f"{allowed}); move the data there or add its folder to the setting",
            field=field,
        )
    if not path.exists():
        raise NotFound(f"{field} {uri!r} does not exist")
    return path


def uri_format(path: Path) -> UriFormat:
    """A tf.data.Dataset.save folder, else TFRecord files."""
    return UriFormat.SAVED if (path / SAVED_SPEC_FILE).is_file() else UriFormat.TFRECORD


def tfrecord_files(path: Path, field: str = "dataset.uri") -> list[Path]:
    """The file itself, or the TFRecord files of a folder, sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TFRECORD_SUFFIXES)
    if not files:
        raise InvalidRequest(
            f"{field}: {str(path)!r} is neither a tf.data.Dataset.save folder (no "
            f"{SAVED_SPEC_FILE}) nor holds TFRecord files ({', '.join(TFRECORD_SUFFIXES)})",
            field=field,
        )
    return files


def check_uri(ref: DatasetRef, roots: Sequence[Path], field: str = "dataset") -> Path:
    """Everything about a uri source that can be known without reading it."""
    path = local_path(ref.uri, roots, f"{field}.uri")
    if uri_format(path) is UriFormat.SAVED:
        if ref.feature_spec:
            raise InvalidRequest(
                f"{field}.feature_spec is for TFRecord files; {ref.uri!r} is a "
                "tf.data.Dataset.save folder, which carries its own element spec",
                field=f"{field}.feature_spec",
            )
        return path
    tfrecord_files(path, f"{field}.uri")
    if not ref.feature_spec:
        raise InvalidRequest(
            f"{field}.feature_spec is required for TFRecord files: name each feature with "
            "its 'dtype:shape', e.g. {'x': 'float32:28,28', 'y': 'int64:'}",
            field=f"{field}.feature_spec",
        )
    return path
