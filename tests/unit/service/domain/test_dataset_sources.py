"""Uri checks without TensorFlow: only local paths under the roots, in a known format."""

from pathlib import Path

import pytest

from service.domain import dataset_sources
from service.domain.requests import DatasetRef
from service.errors import InvalidRequest, NotFound


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "saved").mkdir(parents=True)
    (tmp_path / "root" / "saved" / "dataset_spec.pb").write_bytes(b"")
    (tmp_path / "root" / "records").mkdir()
    (tmp_path / "root" / "records" / "b.tfrecord").write_bytes(b"")
    (tmp_path / "root" / "records" / "a.tfrecord").write_bytes(b"")
    (tmp_path / "root" / "records" / "README").write_text("")
    (tmp_path / "root" / "empty").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


def test_local_paths_and_file_urls_under_a_root(root: Path):
    assert dataset_sources.local_path(str(root / "saved"), [root]) == root / "saved"
    assert dataset_sources.local_path(f"file://{root}/saved", [root]) == root / "saved"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/x", "s3:// URLs are not supported yet"),
        ("gs://bucket/x", "gs:// URLs are not supported yet"),
        ("relative/path", "must be an absolute path"),
        ("{root}/../outside", "is outside the dataset_roots setting (FITSERVE_DATASET_ROOTS"),
    ],
)
def test_refused_uris_name_the_setting_or_the_rule(root: Path, uri: str, message: str):
    with pytest.raises(InvalidRequest) as info:
        dataset_sources.local_path(uri.format(root=root), [root])
    assert message in info.value.message
    assert info.value.field == "dataset.uri"


def test_a_symlink_out_of_the_root_is_outside(root: Path):
    (root / "link").symlink_to(root.parent / "outside")
    with pytest.raises(InvalidRequest, match="outside the dataset_roots"):
        dataset_sources.local_path(str(root / "link"), [root])


def test_a_missing_path_is_not_found(root: Path):
    with pytest.raises(NotFound, match="does not exist"):
        dataset_sources.local_path(str(root / "nope"), [root])


def test_formats_and_tfrecord_files(root: Path):
    assert dataset_sources.uri_format(root / "saved") is dataset_sources.UriFormat.SAVED
    assert dataset_sources.uri_format(root / "records") is dataset_sources.UriFormat.TFRECORD
    files = dataset_sources.tfrecord_files(root / "records")
    assert [f.name for f in files] == ["a.tfrecord", "b.tfrecord"]
    with pytest.raises(InvalidRequest, match=r"neither a tf\.data\.Dataset\.save folder"):
        dataset_sources.tfrecord_files(root / "empty")


def test_feature_spec_is_required_for_tfrecords_and_refused_for_saved_folders(root: Path):
    with pytest.raises(InvalidRequest) as info:
        dataset_sources.check_uri(DatasetRef(uri=str(root / "records")), [root])
    assert info.value.field == "dataset.feature_spec"
    ref = DatasetRef(uri=str(root / "saved"), feature_spec={"x": "float32:2"})
    with pytest.raises(InvalidRequest, match="carries its own element spec"):
        dataset_sources.check_uri(ref, [root])
    ok = DatasetRef(uri=str(root / "records"), feature_spec={"x": "float32:2"})
    assert dataset_sources.check_uri(ok, [root]) == root / "records"
