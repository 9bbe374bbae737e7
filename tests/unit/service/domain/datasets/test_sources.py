"""Uri checks without TensorFlow: local paths under the roots, URLs of allowed and
installed fsspec protocols that open remote storage, in a known format."""

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from service.domain.datasets import sources
from service.domain.datasets.sources import UriFormat
from service.domain.job_specs import DatasetRef
from service.errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable

SPEC = {"x": "float32:2"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "saved" / "shard").mkdir(parents=True)
    (tmp_path / "root" / "saved" / "dataset_spec.pb").write_bytes(b"spec")
    (tmp_path / "root" / "saved" / "shard" / "0.snapshot").write_bytes(b"12345")
    (tmp_path / "root" / "records").mkdir()
    (tmp_path / "root" / "records" / "b.tfrecord").write_bytes(b"bb")
    (tmp_path / "root" / "records" / "a.tfrecord").write_bytes(b"a")
    (tmp_path / "root" / "records" / "README").write_text("not a record file")
    (tmp_path / "root" / "empty").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


@pytest.fixture
def memory() -> Iterator[fsspec.AbstractFileSystem]:
    """fsspec's in-memory filesystem, as a stand-in for an object store."""
    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/saved/dataset_spec.pb": b"spec", "/bucket/saved/7/0.snapshot": b"data"})
    fs.pipe({"/bucket/records/p-1.tfrec": b"1", "/bucket/records/p-0.tfrec": b"00"})
    yield fs
    fs.rm("/bucket", recursive=True)


def resolve(uri: str, roots: list[Path], **ref: object) -> sources.UriSource:
    return sources.resolve(DatasetRef(uri=uri, **ref), roots, ("memory",))


def test_local_paths_and_file_urls_under_a_root(root: Path):
    assert sources.local_path(str(root / "saved"), [root]) == root / "saved"
    assert sources.local_path(f"file://{root}/saved", [root]) == root / "saved"
    assert sources.local_path(f"file:{root}/saved", [root]) == root / "saved"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("relative/path", "must be an absolute path"),
        ("{root}/../outside", "is outside the dataset_roots setting (FITSERVE_DATASET_ROOTS"),
    ],
)
def test_refused_paths_name_the_setting_or_the_rule(root: Path, uri: str, message: str):
    with pytest.raises(InvalidRequest) as info:
        sources.local_path(uri.format(root=root), [root])
    assert message in info.value.message
    assert info.value.field == "dataset.uri"


def test_a_symlink_out_of_the_root_is_outside(root: Path):
    (root / "link").symlink_to(root.parent / "outside")
    with pytest.raises(InvalidRequest, match="outside the dataset_roots"):
        sources.local_path(str(root / "link"), [root])


def test_a_missing_path_is_not_found(root: Path):
    with pytest.raises(NotFound, match="does not exist"):
        sources.local_path(str(root / "nope"), [root])


def test_url_schemes():
    assert sources.url_scheme("/data/x") == ""
    assert sources.url_scheme("file:///data/x") == ""
    assert sources.url_scheme("S3://bucket/x") == "s3"
    assert sources.url_scheme("s3:bucket/x") == ""  # no '//': not a URL to fsspec


def test_an_uppercase_scheme_reads_like_the_lowercase_one(memory: fsspec.AbstractFileSystem):
    """The api accepts S3://; the worker must then open it, not fail 'Protocol not known'."""
    upper = resolve("MEMORY://bucket/records", [], feature_spec=SPEC)
    lower = resolve("memory://bucket/records", [], feature_spec=SPEC)
    assert (upper.uri, upper.files) == (lower.uri, lower.files)
    assert upper.url(upper.files[0]) == "memory:///bucket/records/p-0.tfrec"


@pytest.mark.parametrize("uri", ["memory:/../", "memory:.", "memory:{cwd}"])
def test_a_scheme_without_slashes_is_refused_not_read_from_the_working_folder(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """fsspec reads 'memory:/../' as a path relative to the cwd: it must not list it."""
    (tmp_path / "memory:").mkdir()
    (tmp_path / "secret.tfrecord").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    ref = DatasetRef(uri=uri.format(cwd=tmp_path), feature_spec=SPEC)
    for check in (
        lambda: sources.resolve(ref, [], ("memory",)),
        lambda: sources.check_uri(ref, [], url_schemes=("memory",)),
    ):
        with pytest.raises(InvalidRequest) as info:
            check()
        assert "neither a URL nor a local path" in info.value.message
        assert "memory://<bucket>/<path>" in info.value.message
        assert info.value.field == "dataset.uri"


def test_a_scheme_that_opens_local_files_is_refused(root: Path):
    """An operator who allows fsspec's 'local' protocol must not open the roots check."""
    uri = f"local://{root.parent / 'outside'}"
    (root.parent / "outside" / "secret.tfrecord").write_bytes(b"x")
    ref = DatasetRef(uri=uri, feature_spec=SPEC)
    with pytest.raises(InvalidRequest) as info:
        sources.resolve(ref, [root], ("local",))
    assert "local:// URLs open local files" in info.value.message
    assert "absolute path under the dataset_roots" in info.value.message
    assert info.value.field == "dataset.uri"
    with pytest.raises(InvalidRequest, match="open local files"):
        sources.check_uri(ref, [root], url_schemes=("local",))


@pytest.mark.parametrize(
    ("uri", "allowed", "message"),
    [
        (
            "http://host/x",
            ("s3", "gs"),
            "http:// URLs are not allowed here (allowed: s3://, gs://)",
        ),
        ("memory://x", ("s3",), "memory:// URLs are not allowed here (allowed: s3://)"),
        ("gs://bucket/x", (), "gs:// URLs are not allowed here (allowed: none)"),
        ("s3://b/x::http://h/y", ("s3", "http"), "chained fsspec URLs (with '::')"),
    ],
)
def test_a_scheme_outside_the_allowlist_names_the_setting(uri, allowed, message):
    with pytest.raises(InvalidRequest) as info:
        sources.check_url(uri, allowed)
    assert message in info.value.message
    assert info.value.field == "dataset.uri"
    if "::" not in uri:
        assert "FITSERVE_DATASET_URL_SCHEMES" in info.value.message


@pytest.mark.parametrize(
    ("uri", "package", "extra"),
    [
        ("s3://bucket/x", "s3fs", "s3"),
        ("gs://b/x", "gcsfs", "gcs"),
        ("abfss://c@a/x", "adlfs", "azure"),
    ],
)
def test_an_allowed_scheme_without_its_package_names_the_package(uri, package, extra):
    with pytest.raises(FailedPrecondition) as info:
        sources.check_url(uri, sources.DEFAULT_URL_SCHEMES)
    assert (
        f"pip install 'fitserve-server[{extra}]' (or pip install {package})" in info.value.message
    )
    assert uri in info.value.message


def test_the_api_check_of_a_url_reads_no_storage():
    """A missing object at an allowed URL passes: only the worker, which reads, lists it."""
    ref = DatasetRef(uri="memory://bucket/never-written", feature_spec=SPEC)
    sources.check_uri(ref, [], url_schemes=("memory",))
    one_file = DatasetRef(uri="memory://bucket/never-written.tfrecord")
    with pytest.raises(InvalidRequest, match="feature_spec is required for TFRecord files"):
        sources.check_uri(one_file, [], url_schemes=("memory",))


def test_local_formats_and_sizes(root: Path):
    saved = resolve(str(root / "saved"), [root])
    assert (saved.format, saved.local, saved.size_bytes) == (UriFormat.SAVED, True, 9)
    records = resolve(str(root / "records"), [root], feature_spec=SPEC)
    assert records.format is UriFormat.TFRECORD
    assert [Path(f.name).name for f in records.files] == ["a.tfrecord", "b.tfrecord"]
    assert records.size_bytes == 3
    one = resolve(str(root / "records" / "b.tfrecord"), [root], feature_spec=SPEC)
    assert [f.size for f in one.files] == [2]
    with pytest.raises(InvalidRequest, match=r"neither a tf\.data\.Dataset\.save folder"):
        resolve(str(root / "empty"), [root], feature_spec=SPEC)


def test_url_formats_and_sizes(memory: fsspec.AbstractFileSystem):
    saved = resolve("memory://bucket/saved", [])
    assert (saved.format, saved.local, saved.size_bytes) == (UriFormat.SAVED, False, 8)
    records = resolve("memory://bucket/records", [], feature_spec=SPEC)
    assert [records.url(f) for f in records.files] == [
        "memory:///bucket/records/p-0.tfrec",
        "memory:///bucket/records/p-1.tfrec",
    ]
    assert records.size_bytes == 3
    with records.open(records.files[0]) as f:
        assert f.read() == b"00"


def test_a_missing_url_is_not_found(memory: fsspec.AbstractFileSystem):
    with pytest.raises(NotFound, match=r"dataset\.uri 'memory://bucket/nope' does not exist"):
        resolve("memory://bucket/nope", [], feature_spec=SPEC)
    with pytest.raises(NotFound, match="does not exist"):
        resolve("memory://bucket/nope.tfrecord", [], feature_spec=SPEC)


def test_storage_errors_name_the_uri():
    missing = pytest.raises(NotFound, match="'s3://b/x' does not exist")
    with missing, sources.storage_errors("s3://b/x"):
        raise FileNotFoundError("b/x")
    unreachable = FileNotFoundError("http://h/x")
    unreachable.__cause__ = ConnectionRefusedError("connect call failed")
    with pytest.raises(Unavailable) as info, sources.storage_errors("http://h/x"):
        raise unreachable
    assert "'http://h/x' could not be read from its storage (ConnectionRefusedError" in str(
        info.value
    )


def test_feature_spec_is_required_for_tfrecords_and_refused_for_saved_folders(root: Path):
    with pytest.raises(InvalidRequest) as info:
        sources.check_uri(DatasetRef(uri=str(root / "records")), [root])
    assert info.value.field == "dataset.feature_spec"
    ref = DatasetRef(uri=str(root / "saved"), feature_spec=SPEC)
    with pytest.raises(InvalidRequest, match="carries its own element spec"):
        sources.check_uri(ref, [root])
    sources.check_uri(DatasetRef(uri=str(root / "records"), feature_spec=SPEC), [root])


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("{root}/sa\x00ved", "holds a control character (NUL, a newline, ...)"),
        ("file://{root}/sa%00ved", "holds a control character"),
        ("{root}/line\nbreak", "holds a control character"),
        ("{root}/" + "a" * 300, "has a path component of 300 bytes; the limit is 255 (NAME_MAX)"),
        ("{root}/" + "é" * 128, "has a path component of 256 bytes"),
        ("{root}" + "/abc" * 1100, "bytes long; the limit is 4096 (PATH_MAX)"),
        ("file://[{root}", "is not a valid URL"),
    ],
    ids=["nul", "escaped-nul", "newline", "long-name", "long-utf8-name", "long-path", "ipv6"],
)
def test_paths_the_operating_system_would_refuse_are_invalid(root: Path, uri: str, message: str):
    for check in (
        lambda u: sources.local_path(u, [root]),
        lambda u: sources.check_uri(DatasetRef.model_construct(uri=u), [root]),
    ):
        with pytest.raises(InvalidRequest) as info:
            check(uri.format(root=root))
        assert message in info.value.message
        assert info.value.field == "dataset.uri"
        assert len(info.value.message) < 400


@pytest.mark.parametrize("uri", ["s3://bucket/a\x00b", "memory://bucket/" + "a" * 5000])
def test_urls_with_control_characters_or_too_long_are_invalid_before_any_storage(uri: str):
    with pytest.raises(InvalidRequest) as info:
        sources.check_uri(DatasetRef.model_construct(uri=uri), [], url_schemes=("s3", "memory"))
    assert info.value.field == "dataset.uri"
    with pytest.raises(InvalidRequest):
        sources.resolve(DatasetRef.model_construct(uri=uri), [], ("s3", "memory"))


def test_a_symlink_loop_is_invalid_not_a_crash(root: Path):
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises((InvalidRequest, NotFound)) as info:
        sources.local_path(str(root / "loop" / "x"), [root])
    assert "loop" in info.value.message
