"""TFRecord files read from any file object, in pure Python (no TensorFlow).

TensorFlow reads TFRecord files only through its own filesystems, so files behind an
fsspec URL are read with this and handed to tf.data record by record. Each record is
framed as (little-endian)::

    uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)

Both checksums are checked, as TensorFlow's own reader does, so a truncated, compressed
or corrupt file fails naming the file and the byte where its bad record starts, instead
of handing garbage to parsing. Reads are bounded by one record, and a record by the file's
size (from its listing) or else by ``MAX_RECORD_BYTES``, before it is read: a length that
passes its checksum but claims more than the file holds (a crafted file) fails instead of
reading the rest of the file into memory. CRC-32C in pure Python is slow (the README
gives the rate); the dataset cache (``dataset_cache_bytes``) makes that a cost of the first
epoch only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

from service.errors import InvalidRequest

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
MAX_RECORD_BYTES = 256 * 1024 * 1024  # one record of a file whose size is unknown


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _tables() -> list[list[int]]:
    """Slicing-by-8 tables: eight bytes per loop turn instead of one."""
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        first.append(crc)
    tables = [first]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ first[prev[i] & 0xFF] for i in range(256)])
    return tables


_T = _tables()


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data``."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc = 0xFFFFFFFF
    whole = len(data) - len(data) % 8
    for lo, hi in struct.iter_unpack("<II", memoryview(data)[:whole]):
        crc ^= lo
        crc = (
            t7[crc & 0xFF]
            ^ t6[(crc >> 8) & 0xFF]
            ^ t5[(crc >> 16) & 0xFF]
            ^ t4[crc >> 24]
            ^ t3[hi & 0xFF]
            ^ t2[(hi >> 8) & 0xFF]
            ^ t1[(hi >> 16) & 0xFF]
            ^ t0[hi >> 24]
        )
    for byte in data[whole:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord files store: CRC-32C, rotated and offset."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(file: Readable, name: str, size: int | None = None) -> Iterator[bytes]:
    """The records of a TFRecord file of ``size`` bytes (None: unknown), one at a time;
    ``name`` is for error messages."""
    offset = 0
    while header := _read_exactly(file, _HEADER.size):
        if len(header) < _HEADER.size:
            raise _corrupt(name, offset, "the file ends inside a record header (cut short?)")
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc:
            raise _corrupt(
                name,
                offset,
                "the record length fails its checksum (not an uncompressed TFRecord file?)",
            )
        _check_length(name, offset, length, size)
        body = _read_exactly(file, length + _FOOTER.size)
        if len(body) < length + _FOOTER.size:
            raise _corrupt(
                name, offset, f"the file ends inside a record of {length} bytes (cut short?)"
            )
        data = body[:length]
        if masked_crc32c(data) != _FOOTER.unpack_from(body, length)[0]:
            raise _corrupt(name, offset, "the record data fails its checksum")
        yield data
        offset += _HEADER.size + len(body)


def _check_length(name: str, offset: int, length: int, size: int | None) -> None:
    """Refuse a record before reading it when it cannot fit the file, or is too big to
    hold when the file's size is unknown."""
    end = offset + _HEADER.size + length + _FOOTER.size
    if size is not None and end > size:
        raise _corrupt(
            name,
            offset,
            f"the file ends inside a record of {length} bytes (cut short? the record would "
            f"end at byte {end}, the file has {size} bytes)",
        )
    if size is None and length > MAX_RECORD_BYTES:
        raise InvalidRequest(
            f"TFRecord file {name!r} has a record of {length} bytes at byte {offset}, more "
            f"than the {MAX_RECORD_BYTES} bytes read as one record from a file of unknown "
            "size; write smaller records (tf.train.Example per example), or the file is corrupt"
        )


def _read_exactly(file: Readable, size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the file (streams may return short reads)."""
    chunks, left = [], size
    while left:
        chunk = file.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _corrupt(name: str, offset: int, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"TFRecord file {name!r} is corrupt at byte {offset}: {why}; expected records "
        "as tf.io.TFRecordWriter writes them"
    )
