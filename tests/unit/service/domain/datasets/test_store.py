import hashlib
import io
import re
import types
import warnings
import zipfile

import numpy as np
import pytest

from service.domain.datasets import store as dataset_store
from service.domain.datasets.npz import ArrayHeader
from service.domain.datasets.store import DatasetStore
from service.errors import InvalidRequest, NotFound, ResourceExhausted


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=True, **arrays)
    return buffer.getvalue()


XY = npz(x=np.arange(12, dtype=np.float32).reshape(4, 3), y=np.array([0, 1, 1, 0], np.int64))


@pytest.fixture
def store(tmp_path):
    return DatasetStore(tmp_path / "datasets", max_bytes=64 * 1024)


@pytest.fixture
def clock(monkeypatch):
    """Upload times 100, 200, 300, ... so that 'newest first' is deterministic."""
    ticks = iter(range(100, 10_000, 100))
    monkeypatch.setattr(
        dataset_store, "time", types.SimpleNamespace(time=lambda: float(next(ticks)))
    )


def upload(store, name, content=XY, chunk=100, **header):
    up = store.begin_upload(name, "npz", **header)
    try:
        for start in range(0, len(content), chunk):
            up.write(content[start : start + chunk])
        return up.finish()
    finally:
        up.abort()


def files(store, folder):
    path = store.root / folder
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_an_upload_in_chunks_is_found_by_name_and_id(store):
    info = upload(store, "iris", chunk=7)

    digest = hashlib.sha256(XY).hexdigest()
    assert info.id == f"sha256:{digest}"
    assert info.name == "iris"
    assert info.format == "npz"
    assert info.size_bytes == len(XY)
    assert info.num_examples == 4
    assert info.arrays == (
        ArrayHeader("x", "float32", (4, 3)),
        ArrayHeader("y", "int64", (4,)),
    )
    assert store.get("iris") == info
    assert store.get(info.id) == info
    assert store.path(info.id).read_bytes() == XY
    assert files(store, "incoming") == []


def test_the_header_size_and_sha_are_checked_when_they_match(store):
    info = upload(store, "d", size=len(XY), sha256=hashlib.sha256(XY).hexdigest().upper())

    assert info.size_bytes == len(XY)


def test_the_same_content_under_two_names_is_stored_once(store):
    a = upload(store, "a")
    b = upload(store, "b")

    assert a.id == b.id
    assert [p for p in files(store, "blobs") if p.endswith(".npz")] == [
        f"{a.id.removeprefix('sha256:')}.npz"
    ]
    assert {store.get("a").name, store.get("b").name} == {"a", "b"}


def test_an_upload_past_the_size_limit_is_refused_and_leaves_nothing(tmp_path):
    store = DatasetStore(tmp_path, max_bytes=len(XY) - 1)
    up = store.begin_upload("big", "npz")
    up.write(XY[:-1])  # exactly at the limit

    with pytest.raises(ResourceExhausted, match=f"{len(XY) - 1} byte limit"):
        up.write(XY[-1:])
    up.abort()  # what the api does when a write fails

    assert files(store, "incoming") == []
    assert files(store, "blobs") == []
    assert store.list() == []


def test_an_announced_size_past_the_limit_is_refused_before_any_file(tmp_path):
    store = DatasetStore(tmp_path, max_bytes=100)

    with pytest.raises(ResourceExhausted, match="101 bytes is over the 100 byte limit"):
        store.begin_upload("big", "npz", size=101)

    assert files(store, "incoming") == []


def test_a_negative_announced_size_is_invalid_not_over_the_limit(tmp_path):
    # found by tests/integration/test_fuzz.py: it was RESOURCE_EXHAUSTED, "-1 bytes is over
    # the limit", with a pushback that tells gRPC not to retry
    store = DatasetStore(tmp_path, max_bytes=100)

    with pytest.raises(InvalidRequest, match=r"header\.size_bytes is -1") as info:
        store.begin_upload("neg", "npz", size=-1)

    assert info.value.field == "header.size_bytes"
    assert files(store, "incoming") == []


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"size": len(XY) + 1}, f"ended after {len(XY)} bytes; the header announced {len(XY) + 1}"),
        ({"sha256": "0" * 64}, "the header announced " + "0" * 64),
    ],
    ids=["size", "sha256"],
)
def test_a_header_mismatch_is_refused_and_leaves_nothing(store, header, message):
    with pytest.raises(InvalidRequest, match=message):
        upload(store, "d", **header)

    assert files(store, "incoming") == []
    assert files(store, "blobs") == []
    assert files(store, "names") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (npz(x=np.array([{"a": 1}, None], dtype=object)), "array 'x' holds Python objects"),
        (
            npz(x=np.zeros((3, 2), np.float32), y=np.zeros(2, np.int64)),
            r"different numbers of examples \(x: 3, y: 2\)",
        ),
        (npz(x=np.float32(1.0)), "array 'x' is a scalar"),
        (npz(s=np.array(["a", "b"])), "array 's' has dtype str"),
        (b"this is not a zip file", "not a valid .npz file"),
        (npz(), "holds no arrays"),
    ],
    ids=["pickled-object", "lengths", "scalar", "text", "not-a-zip", "empty"],
)
def test_invalid_content_is_refused_and_leaves_nothing(store, content, message):
    with pytest.raises(InvalidRequest, match=message):
        upload(store, "d", content=content)

    assert files(store, "incoming") == []
    assert [p for p in files(store, "blobs") if p.endswith(".npz")] == []
    assert store.list() == []


def test_an_empty_upload_is_refused(store):
    with pytest.raises(InvalidRequest, match="no content"):
        upload(store, "d", content=b"")


@pytest.mark.parametrize(("name", "fmt"), [("Bad/Name", "npz"), ("ok", "csv")])
def test_a_bad_header_is_refused_with_its_field(store, name, fmt):
    with pytest.raises(InvalidRequest) as info:
        store.begin_upload(name, fmt)

    assert info.value.field in {"header.name", "header.format"}


def test_delete_by_name_keeps_the_blob_until_the_last_name_goes(store):
    info = upload(store, "a")
    upload(store, "b")
    blob = store.path(info.id)

    store.delete("a")

    assert blob.exists()
    assert [d.name for d in store.list()] == ["b"]
    with pytest.raises(NotFound):
        store.get("a")

    store.delete("b")

    assert not blob.exists()
    assert files(store, "blobs") == []
    assert store.list() == []
    with pytest.raises(NotFound):
        store.get(info.id)


def test_delete_by_id_removes_every_name_and_the_blob(store):
    info = upload(store, "a")
    upload(store, "b")
    other = upload(store, "c", content=npz(x=np.ones(2, np.float32)))

    store.delete(info.id)

    assert [d.name for d in store.list()] == ["c"]
    assert not store.path(info.id).exists()
    assert store.path(other.id).exists()


def test_list_is_newest_first(store, clock):
    upload(store, "a")
    upload(store, "c", content=npz(x=np.ones(2, np.float32)))
    upload(store, "b")

    listed = store.list()

    assert [d.name for d in listed] == ["b", "c", "a"]
    assert [d.created_at for d in listed] == [300.0, 200.0, 100.0]


def test_list_of_an_empty_store_is_empty(store):
    assert store.list() == []


def test_get_by_id_picks_the_newest_name(store, clock):
    info = upload(store, "old")
    upload(store, "new")

    assert store.get(info.id).name == "new"


@pytest.mark.parametrize(
    ("call", "ref", "message"),
    [
        ("get", "missing", "dataset 'missing' not found; upload it with UploadDataset"),
        ("get", "sha256:" + "a" * 64, "not found"),
        ("delete", "missing", "dataset 'missing' not found"),
        ("delete", "sha256:" + "a" * 64, "not found"),
    ],
)
def test_unknown_datasets_are_not_found(store, call, ref, message):
    upload(store, "present")

    with pytest.raises(NotFound, match=message):
        getattr(store, call)(ref)

    assert [d.name for d in store.list()] == ["present"]


@pytest.mark.parametrize("ref", ["sha256:abc", "sha256:" + "G" * 64])
def test_a_malformed_id_is_refused(store, ref):
    with pytest.raises(InvalidRequest, match="is not a dataset id"):
        store.get(ref)
    with pytest.raises(InvalidRequest, match="is not a dataset id"):
        store.delete(ref)


# -- zip bombs and headers that lie: checked before anything is stored ------------------


def npy_header(shape, dtype="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def bomb(declared_rows, real_rows, cols=1024):
    """A deflated .npz whose 'x' declares ``declared_rows`` float32 rows and holds
    ``real_rows`` rows of zeros: 4 KB a row, a few bytes a row once compressed."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        member.write(npy_header((declared_rows, cols)))
        row = bytes(4 * cols)
        for _ in range(real_rows):
            member.write(row)
    return buffer.getvalue()


def nothing_stored(store):
    return (
        files(store, "blobs") == []
        and files(store, "names") == []
        and (files(store, "incoming") == [])
    )


def test_arrays_that_declare_more_than_the_expanded_limit_are_refused_unread(tmp_path):
    store = DatasetStore(tmp_path / "datasets", max_bytes=1024**2, max_expanded_bytes=8 * 1024**2)
    content = bomb(declared_rows=16 * 1024, real_rows=16 * 1024)  # 64 MB in 64 KB

    assert len(content) < 1024**2
    with pytest.raises(ResourceExhausted) as info:
        upload(store, "bomb", content, chunk=64 * 1024)
    assert info.value.message == (
        "the dataset's arrays hold 67,108,864 bytes unpacked (largest: 'x', (16384, 1024) "
        "float32); the limit is 8,388,608 bytes (FITSERVE_MAX_DATASET_EXPANDED_BYTES)"
    )
    assert nothing_stored(store)


def test_the_expanded_limit_defaults_to_the_upload_limit(tmp_path):
    store = DatasetStore(tmp_path / "datasets", max_bytes=1024**2)
    assert store.max_expanded_bytes == 1024**2
    with pytest.raises(ResourceExhausted, match="the limit is 1,048,576 bytes"):
        upload(store, "bomb", bomb(declared_rows=512, real_rows=0))
    assert nothing_stored(store)


def test_a_member_is_streamed_a_chunk_at_a_time_never_read_whole(tmp_path, monkeypatch):
    from service.domain.datasets import npz as npz_module

    reads = []
    real_open = zipfile.ZipFile.open

    def watched_open(self, *args, **kwargs):
        f = real_open(self, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(zipfile.ZipFile, "open", watched_open)
    store = DatasetStore(tmp_path / "datasets", max_bytes=1024**2, max_expanded_bytes=64 * 1024**2)
    info = upload(store, "zeros", bomb(declared_rows=4096, real_rows=4096), chunk=64 * 1024)

    assert info.arrays == (ArrayHeader("x", "float32", (4096, 1024)),)
    assert -1 not in reads
    assert None not in reads
    assert max(reads) <= npz_module.CHUNK_BYTES


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            bomb(declared_rows=10**9, real_rows=1),
            "the dataset's arrays hold 4,096,000,000,000 bytes unpacked",
        ),
        (
            npz(x=np.zeros(3)).replace(b"(3,)", b"(9,)"),  # the zip's CRC no longer matches
            "not a valid .npz file",
        ),
    ],
)
def test_headers_that_lie_are_refused_and_leave_nothing(store, content, message):
    with pytest.raises((InvalidRequest, ResourceExhausted), match=re.escape(message)):
        upload(store, "liar", content)
    assert nothing_stored(store)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (
            [("x.npy", npy_header((100,)) + bytes(8))],
            "array 'x' holds 8 bytes of data; its "
            "header declares (100,) float32, 400 bytes (cut short?)",
        ),
        (
            [("x.npy", npy_header((2,)) + bytes(4000))],
            "array 'x' holds more data than its header declares ((2,) float32, 8 bytes)",
        ),
        ([("x.npy", npy_header((-2,)))], "array 'x' has a negative dimension in its shape (-2,)"),
        ([("x.npy", npy_header((2,)) + bytes(8))] * 2, "dataset holds 'x.npy' twice"),
        ([(f"a{i}.npy", npy_header((1,)) + bytes(4)) for i in range(1025)], "holds 1025 arrays"),
    ],
    ids=["short", "long", "negative", "duplicate", "too-many"],
)
def test_members_that_do_not_hold_what_their_header_says_are_refused(tmp_path, members, message):
    store = DatasetStore(tmp_path / "datasets", max_bytes=1024**2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    with pytest.raises(InvalidRequest) as info:
        upload(store, "liar", buffer.getvalue(), chunk=4096)
    assert message in info.value.message
    assert nothing_stored(store)


def npy_with_header(text, version=1):
    """An .npy member whose header is ``text``, whatever it says, and no data."""
    body = text.encode("latin1")
    body += b" " * (-(len(body) + 11) % 64) + b"\n"
    size = len(body).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + body


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (",  # cut short
        '"""',
        "\x1b[31m",
        "(" * 300,
        "not python at all",
    ],
    ids=["unclosed-bracket", "unclosed-string", "escape", "deep", "text"],
)
def test_an_npy_header_that_numpy_cannot_tokenize_is_invalid(store, header, version):
    # found by tests/integration/test_fuzz.py: numpy's header filter raised
    # tokenize.TokenError (no ValueError), which answered INTERNAL
    content = zipped_members([("x.npy", npy_with_header(header, version))])
    with pytest.raises(InvalidRequest, match=r"not a valid \.npz file"):
        upload(store, "garbled", content)
    assert nothing_stored(store)


def zipped_members(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_stored_uncompressed_npz_passes_the_checks(store):
    info = upload(store, "plain", XY)
    assert [a.shape for a in info.arrays] == [(4, 3), (4,)]
