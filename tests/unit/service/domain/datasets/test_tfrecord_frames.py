"""The pure-Python TFRecord reader against files TensorFlow itself writes."""

import io
import struct
from pathlib import Path

import pytest
import tensorflow as tf

from service.domain.datasets.tfrecord_frames import (
    MAX_RECORD_BYTES,
    crc32c,
    masked_crc32c,
    read_records,
)
from service.errors import InvalidRequest

RECORDS = [b"", b"x", b"hello world", bytes(range(256)) * 40]


class Trickle(io.BytesIO):
    """A stream that returns at most 3 bytes a read, as network streams may."""

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(3 if size is None or size < 0 else min(size, 3))


@pytest.fixture
def written(tmp_path: Path) -> bytes:
    path = tmp_path / "part.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in RECORDS:
            writer.write(record)
    return path.read_bytes()


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, 32 zero bytes


def test_reads_back_what_tensorflow_wrote(written: bytes):
    assert list(read_records(io.BytesIO(written), "part")) == RECORDS
    assert list(read_records(Trickle(written), "part")) == RECORDS
    assert list(read_records(io.BytesIO(b""), "empty")) == []


def test_tensorflow_reads_what_the_checksums_describe(tmp_path: Path):
    """The masked crc is the one TF checks: a frame built here is read by TFRecordDataset."""
    data = b"built by hand"
    length = struct.pack("<Q", len(data))
    frame = length + struct.pack("<I", masked_crc32c(length)) + data
    (tmp_path / "hand.tfrecord").write_bytes(frame + struct.pack("<I", masked_crc32c(data)))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "hand.tfrecord"))] == [data]


def second_record_at(written: bytes) -> int:
    return 8 + 4 + len(RECORDS[0]) + 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b, at: b[: at + 5], "ends inside a record header"),
        (lambda b, at: b[: at + 12], "ends inside a record of 1 bytes"),
        (lambda b, at: b[:at] + b"\xff" + b[at + 1 :], "record length fails its checksum"),
        (lambda b, at: b[: at + 12] + b"y" + b[at + 13 :], "record data fails its checksum"),
        (lambda b, at: b[: at + 14] + b"\0" + b[at + 15 :], "record data fails its checksum"),
    ],
)
def test_a_damaged_file_fails_at_its_bad_record(written: bytes, damage, message: str):
    at = second_record_at(written)
    records = read_records(io.BytesIO(damage(written, at)), "s3://b/part.tfrecord")
    assert next(records) == RECORDS[0]
    with pytest.raises(InvalidRequest) as info:
        next(records)
    assert message in info.value.message
    assert f"'s3://b/part.tfrecord' is corrupt at byte {at}" in info.value.message


def test_a_file_that_is_not_tfrecord_fails_at_once():
    with pytest.raises(InvalidRequest, match="not an uncompressed TFRecord file"):
        next(read_records(io.BytesIO(b"PK\x03\x04 a zip file, not records"), "data.zip"))


def test_a_huge_length_fails_its_checksum_before_anything_is_read():
    header = struct.pack("<Q", 2**62) + b"\0\0\0\0"
    with pytest.raises(InvalidRequest, match="record length fails its checksum"):
        next(read_records(io.BytesIO(header + b"rest"), "f"))


def _claiming(length: int) -> bytes:
    """A record header whose length passes its checksum: a crafted or damaged file."""
    raw = struct.pack("<Q", length)
    return raw + struct.pack("<I", masked_crc32c(raw))


def test_a_record_longer_than_the_file_fails_before_it_is_read(written: bytes, tmp_path: Path):
    path = tmp_path / "crafted.tfrecord"
    path.write_bytes(written + _claiming(2**40) + bytes(1000))
    size = path.stat().st_size
    with path.open("rb") as f:
        records = read_records(f, "s3://b/crafted.tfrecord", size)
        assert [next(records) for _ in RECORDS] == RECORDS
        with pytest.raises(InvalidRequest) as info:
            next(records)
        assert f.tell() == len(written) + 12  # the header, not the rest of the file
    assert f"'s3://b/crafted.tfrecord' is corrupt at byte {len(written)}" in info.value.message
    assert f"a record of {2**40} bytes" in info.value.message
    assert f"the file has {size} bytes" in info.value.message


def test_a_whole_file_is_read_with_its_size(written: bytes):
    assert list(read_records(io.BytesIO(written), "part", len(written))) == RECORDS
    with pytest.raises(InvalidRequest, match="ends inside a record of 10240 bytes"):
        list(read_records(io.BytesIO(written), "part", len(written) - 1))


def test_a_record_over_the_limit_of_a_file_of_unknown_size_is_refused(tmp_path: Path):
    path = tmp_path / "huge.tfrecord"
    path.write_bytes(_claiming(MAX_RECORD_BYTES + 1) + bytes(1000))
    with path.open("rb") as f:
        with pytest.raises(InvalidRequest) as info:
            next(read_records(f, "http://h/huge.tfrecord"))
        assert f.tell() == 12
    assert (
        f"'http://h/huge.tfrecord' has a record of {MAX_RECORD_BYTES + 1} bytes at byte 0, "
        f"more than the {MAX_RECORD_BYTES} bytes"
    ) in info.value.message
