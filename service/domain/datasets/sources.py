"""Datasets referenced by URI: the rules both roles check, and what a uri holds.

A ``DatasetRef.uri`` names a folder written by ``tf.data.Dataset.save`` or TFRecord
files (one file, or a folder of them), as a local path or as an fsspec URL:

- A local path (or ``file://`` URL) must lie under one of the ``dataset_roots``, so a
  request cannot make a worker open any file it can reach.
- A URL is written ``scheme://...`` (fsspec reads ``s3:x`` as a local path). Its scheme,
  in any case, must be one of the ``dataset_url_schemes`` (object stores by default), so
  a request cannot make a worker fetch arbitrary URLs, and its fsspec package (s3fs,
  gcsfs, adlfs) must be installed and open remote storage, not local files. Credentials
  come from the process environment, read by those packages as usual. A URL names one
  TFRecord file when it ends in one of ``TFRECORD_SUFFIXES``, else a folder.

Every uri is at most ``MAX_URI_BYTES`` (PATH_MAX) of UTF-8 without control characters
(NUL, newlines), and each component of a local path at most ``MAX_NAME_BYTES``
(NAME_MAX): what the operating system would refuse is refused as INVALID_ARGUMENT first.

The api runs :func:`check_uri` to answer at once; for a URL that covers only what needs
no storage access (the api need not hold storage credentials). The worker runs
:func:`resolve`, which lists the storage, since it is the one that reads, and copies what
it cannot stream with ``service.domain.datasets.cache``. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import enum
import re
import urllib.parse
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from service.domain.job_specs import DatasetRef
from service.errors import (
    FailedPrecondition,
    FitserveError,
    InvalidRequest,
    NotFound,
    Unavailable,
    shown,
)

SAVED_SPEC_FILE = "dataset_spec.pb"  # what tf.data.Dataset.save writes first
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
DEFAULT_URL_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
# The extra of fitserve-server that installs a protocol's package, where there is one.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"} | dict.fromkeys(
    ("az", "abfs", "abfss"), "azure"
)
# Protocols fsspec knows only once their package is installed.
_PACKAGES = {"abfss": "adlfs"}
# HTTP servers need not answer range requests: stream http(s) files front to back.
_OPEN_OPTIONS: dict[str, dict[str, Any]] = {"http": {"block_size": 0}, "https": {"block_size": 0}}
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "LastModified", "Last-Modified", "updated", "mtime")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_URI_BYTES = 4096  # PATH_MAX
MAX_NAME_BYTES = 255  # NAME_MAX: one component of a local path


class UriFormat(enum.StrEnum):
    SAVED = "saved"
    TFRECORD = "tfrecord"


@dataclass(frozen=True)
class StoredFile:
    """One file of a uri as its storage lists it; ``version`` tells a rewrite apart."""

    name: str
    size: int
    version: str = ""


@dataclass(frozen=True)
class UriSource:
    """What a uri holds, from one listing of its storage: the TFRecord files, or every
    file of a Dataset.save folder."""

    uri: str
    format: UriFormat
    fs: Any  # fsspec.AbstractFileSystem
    path: str
    files: tuple[StoredFile, ...]

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def url(self, file: StoredFile) -> str:
        """A file's full URL, for messages."""
        return str(self.fs.unstrip_protocol(file.name))

    def open(self, file: StoredFile) -> BinaryIO:
        """A file opened for reading front to back, a block at a time."""
        protocol = url_scheme(self.uri)
        stream: BinaryIO = self.fs.open(file.name, "rb", **_OPEN_OPTIONS.get(protocol, {}))
        return stream


def url_scheme(uri: str) -> str:
    """The fsspec protocol a uri names, in lowercase; "" for a local path or a file:// URL.
    Only ``scheme://`` makes a URL: fsspec reads ``s3:x`` as a relative local path."""
    match = _URL.match(uri)
    scheme = match.group(1).lower() if match else ""
    return "" if scheme == "file" else scheme


def normalised(uri: str) -> str:
    """A URL with its scheme in lowercase, the only case fsspec knows ("S3://" is s3://)."""
    scheme = url_scheme(uri)
    return scheme + uri[len(scheme) :] if scheme else uri


def check_text(uri: str, field: str = "dataset.uri") -> None:
    """A uri of at most MAX_URI_BYTES without control characters (a NUL would end the
    path where the operating system reads it)."""
    size = len(uri.encode(errors="surrogatepass"))
    if size > MAX_URI_BYTES:
        raise InvalidRequest(
            f"{field} is {size} bytes long; the limit is {MAX_URI_BYTES} (PATH_MAX)", field=field
        )
    if _CONTROL.search(uri):
        raise InvalidRequest(
            f"{field} {shown(uri)} holds a control character (NUL, a newline, ...); a uri "
            "names a file or folder in printable characters",
            field=field,
        )


def _split(uri: str, field: str) -> urllib.parse.SplitResult:
    try:
        return urllib.parse.urlsplit(uri)
    except ValueError as exc:  # "Invalid IPv6 URL": a '[' in the host part
        raise InvalidRequest(
            f"{field} {shown(uri)} is not a valid URL ({exc}); expected scheme://<bucket>/<path> "
            "or an absolute local path",
            field=field,
        ) from None


def check_url(uri: str, url_schemes: Collection[str], field: str = "dataset.uri") -> None:
    """A URL the settings allow, whose fsspec implementation is installed here."""
    check_text(uri, field)
    _split(uri, field)
    scheme = url_scheme(uri)
    if "::" in uri:
        raise InvalidRequest(
            f"{field} {shown(uri)}: chained fsspec URLs (with '::') are not accepted; give the "
            "URL of the data itself",
            field=field,
        )
    if scheme not in url_schemes:
        allowed = ", ".join(f"{s}://" for s in url_schemes) or "none"
        raise InvalidRequest(
            f"{field} {shown(uri)}: {scheme}:// URLs are not allowed here (allowed: {allowed}); "
            "use one of those, a local path under the dataset_roots, or ask the operator to "
            "add the protocol to the dataset_url_schemes setting (FITSERVE_DATASET_URL_SCHEMES)",
            field=field,
        )
    try:
        filesystem = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise FailedPrecondition(_missing_package(uri, scheme, exc, field)) from None
    check_filesystem(uri, filesystem, field)


def check_filesystem(
    uri: str, filesystem: type[fsspec.AbstractFileSystem], field: str = "dataset.uri"
) -> None:
    """The fsspec filesystem that opens a URL must be the remote one its scheme names: a
    URL that opens local files would escape the dataset_roots."""
    scheme = url_scheme(uri)
    if issubclass(filesystem, LocalFileSystem):
        raise InvalidRequest(
            f"{field} {shown(uri)}: {scheme}:// URLs open local files; give local data as an "
            "absolute path under the dataset_roots (FITSERVE_DATASET_ROOTS), and ask the "
            f"operator to remove {scheme!r} from the dataset_url_schemes setting",
            field=field,
        )
    protocol = filesystem.protocol
    protocols = protocol if isinstance(protocol, tuple) else (protocol,)
    if scheme not in protocols and not issubclass(filesystem, fsspec.get_filesystem_class(scheme)):
        raise InvalidRequest(
            f"{field} {shown(uri)} opens as {filesystem.__name__}, not as a {scheme}:// URL; "
            f"expected {scheme}://<bucket>/<path>",
            field=field,
        )


def _missing_package(uri: str, scheme: str, exc: Exception, field: str) -> str:
    known = known_implementations.get(scheme, {})
    package = _PACKAGES.get(scheme) or str(known.get("class", "")).partition(".")[0]
    hint = f"pip install {package}" if package and package != "fsspec" else "install it"
    if scheme in _EXTRAS:
        hint = f"pip install 'fitserve-server[{_EXTRAS[scheme]}]' (or {hint})"
    return (
        f"{field} {shown(uri)}: {scheme}:// URLs need an fsspec implementation that is not "
        f"installed on this server ({known.get('err') or exc}); {hint} on the api servers "
        "and the workers"
    )


def local_path(uri: str, roots: Sequence[Path], field: str = "dataset.uri") -> Path:
    """The resolved local path of a uri, which must lie under one of ``roots``."""
    if url_scheme(uri):
        raise InvalidRequest(f"{field} {shown(uri)} is a URL, not a local path", field=field)
    check_text(uri, field)
    parsed = _split(uri, field)
    if parsed.scheme not in ("", "file") and not _URL.match(uri):
        raise InvalidRequest(
            f"{field} {shown(uri)} is neither a URL nor a local path: write a URL with '//' "
            f"({parsed.scheme}://<bucket>/<path>) and a local path as an absolute path",
            field=field,
        )
    text = urllib.parse.unquote(parsed.path) if parsed.scheme else uri
    if text != uri:
        check_text(text, field)  # file:///a%00b
    raw = Path(text)
    if not raw.is_absolute():
        raise InvalidRequest(f"{field} {shown(uri)} must be an absolute path", field=field)
    longest = max((len(part.encode(errors="surrogatepass")) for part in raw.parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise InvalidRequest(
            f"{field} {shown(uri)} has a path component of {longest} bytes; the limit is "
            f"{MAX_NAME_BYTES} (NAME_MAX)",
            field=field,
        )
    with _local_errors(uri, field):
        path = raw.resolve()
        inside = any(path.is_relative_to(root.resolve()) for root in roots)
    if not inside:
        allowed = ", ".join(str(r) for r in roots)
        raise InvalidRequest(
            f"{field} {shown(uri)} is outside the dataset_roots setting (FITSERVE_DATASET_ROOTS: "
            f"{allowed}); move the data there or add its folder to the setting",
            field=field,
        )
    with _local_errors(uri, field):
        if not path.exists():
            raise NotFound(f"{field} {shown(uri)} does not exist")
    return path


@contextlib.contextmanager
def _local_errors(uri: str, field: str) -> Iterator[None]:
    """What the local file system refuses (a symlink loop, no permission, a name too
    long) as errors naming the uri, never the server's own message."""
    try:
        yield
    except PermissionError:
        raise FailedPrecondition(
            f"{field} {shown(uri)} cannot be read by the server (permission denied); ask the "
            "operator to let the fitserve processes read it"
        ) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11, 3.12)
        why = getattr(exc, "strerror", None) or "symlink loop"
        raise InvalidRequest(
            f"{field} {shown(uri)} cannot be resolved to a file or folder ({why})", field=field
        ) from None


def check_uri(
    ref: DatasetRef,
    roots: Sequence[Path],
    field: str = "dataset",
    url_schemes: Collection[str] = DEFAULT_URL_SCHEMES,
) -> None:
    """Everything about a uri source the api can know at once: for a local path, all
    that :func:`resolve` checks; for a URL, what needs no storage access."""
    check_text(ref.uri, f"{field}.uri")
    if not url_scheme(ref.uri):
        resolve(ref, roots, url_schemes, field)
        return
    check_url(ref.uri, url_schemes, f"{field}.uri")
    if _names_one_file(ref.uri):
        _check_feature_spec(ref, UriFormat.TFRECORD, field)


def resolve(
    ref: DatasetRef, roots: Sequence[Path], url_schemes: Collection[str], field: str = "dataset"
) -> UriSource:
    """Check a uri and list what it holds (NotFound, or Unavailable naming the uri when its
    storage cannot be read)."""
    uri = normalised(ref.uri)
    if url_scheme(uri):
        check_url(uri, url_schemes, f"{field}.uri")
        with storage_errors(uri, f"{field}.uri"):
            fs, path = fsspec.core.url_to_fs(uri)
            check_filesystem(uri, type(fs), f"{field}.uri")
            fs.invalidate_cache()  # a long-lived worker must see the storage as it is now
            source = _listing(uri, fs, path, _names_one_file(uri), f"{field}.uri")
    else:
        local = local_path(uri, roots, f"{field}.uri")
        with storage_errors(uri, f"{field}.uri"):
            fs = LocalFileSystem()
            source = _listing(uri, fs, str(local), local.is_file(), f"{field}.uri")
    _check_feature_spec(ref, source.format, field)
    return source


@contextlib.contextmanager
def storage_errors(uri: str, field: str = "dataset.uri") -> Iterator[None]:
    """Storage failures as errors that name the uri: NotFound, else Unavailable."""
    try:
        yield
    except FitserveError:
        raise
    except FileNotFoundError as exc:
        # fsspec's http reports a host it cannot reach as a missing file
        if not isinstance(exc.__cause__, OSError):
            raise NotFound(f"{field} {shown(uri)} does not exist") from None
        raise Unavailable(_unreadable(uri, exc.__cause__, field)) from None
    except Exception as exc:
        raise Unavailable(_unreadable(uri, exc, field)) from None


def _unreadable(uri: str, exc: BaseException, field: str) -> str:
    return (
        f"{field} {shown(uri)} could not be read from its storage ({type(exc).__name__}: "
        f"{str(exc)[:300]}); "
        "check that the workers can reach it and hold credentials for it"
    )


def _names_one_file(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).path.endswith(TFRECORD_SUFFIXES)


def _listing(uri: str, fs: Any, path: str, one_file: bool, field: str) -> UriSource:
    if one_file:
        return UriSource(uri, UriFormat.TFRECORD, fs, path, (_stored(fs, fs.info(path)),))
    entries = fs.ls(path, detail=True)
    if any(_basename(e["name"]) == SAVED_SPEC_FILE for e in entries):
        files = fs.find(path, detail=True).values()
        return UriSource(uri, UriFormat.SAVED, fs, path, _stored_all(fs, files))
    records = sorted(
        (e for e in entries if e["type"] == "file" and e["name"].endswith(TFRECORD_SUFFIXES)),
        key=lambda e: str(e["name"]),
    )
    if not records:
        raise InvalidRequest(
            f"{field}: {shown(uri)} is neither a tf.data.Dataset.save folder (no "
            f"{SAVED_SPEC_FILE}) nor holds TFRecord files ({', '.join(TFRECORD_SUFFIXES)})",
            field=field,
        )
    return UriSource(uri, UriFormat.TFRECORD, fs, path, _stored_all(fs, records))


def _stored_all(fs: Any, entries: Any) -> tuple[StoredFile, ...]:
    return tuple(_stored(fs, e) for e in entries)


def _stored(fs: Any, entry: dict[str, Any]) -> StoredFile:
    """A listing entry with its size: listings over http carry none, so ask for it."""
    if entry.get("size") is None:
        entry = fs.info(entry["name"])
    version = next((str(entry[k]) for k in _VERSION_KEYS if entry.get(k)), "")
    return StoredFile(str(entry["name"]), int(entry["size"]), version)


def _basename(name: str) -> str:
    return name.rstrip("/").rpartition("/")[2]


def _check_feature_spec(ref: DatasetRef, fmt: UriFormat, field: str) -> None:
    if fmt is UriFormat.SAVED and ref.feature_spec:
        raise InvalidRequest(
            f"{field}.feature_spec is for TFRecord files; {shown(ref.uri)} is a "
            "tf.data.Dataset.save folder, which carries its own element spec",
            field=f"{field}.feature_spec",
        )
    if fmt is UriFormat.TFRECORD and not ref.feature_spec:
        raise InvalidRequest(
            f"{field}.feature_spec is required for TFRecord files: name each feature with "
            "its 'dtype:shape', e.g. {'x': 'float32:28,28', 'y': 'int64:'}",
            field=f"{field}.feature_spec",
        )
