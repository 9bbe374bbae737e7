"""Reads .npz array headers without loading the arrays, and checks that the archive
holds exactly what they declare.

An .npz is a zip of .npy members, and a deflated member can expand a thousandfold: a
2 MB upload may declare (and hold) gigabytes that a worker would load into memory. So
before an upload is accepted, :func:`read_npz_headers`

- reads every member's .npy header and adds up the bytes the arrays declare: over
  ``max_expanded_bytes`` the upload is refused (RESOURCE_EXHAUSTED) before anything is
  decompressed;
- then streams each member through the decompressor a chunk at a time (never the whole
  member in memory), counting its bytes: a member that holds more or fewer bytes than its
  header declares (a header claiming 10**12 rows over a few bytes, or a small header over
  a bomb) is refused as INVALID_ARGUMENT, as is a corrupt one (the zip's CRC).
"""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from service.domain.dtypes import WIRE_DTYPES
from service.errors import InvalidRequest, ResourceExhausted, shown

MAX_ARRAYS = 1024
CHUNK_BYTES = 1024 * 1024
# What a damaged or hostile archive makes zipfile, zlib and numpy raise.
_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RuntimeError,  # an encrypted member
    NotImplementedError,  # a compression method zipfile does not know
    SyntaxError,  # an .npy header that is no Python literal
    tokenize.TokenError,  # one with an unclosed bracket or string, which numpy tokenizes
)


@dataclass(frozen=True)
class ArrayHeader:
    """Name, dtype and shape of one array in an .npz file."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Member:
    header: ArrayHeader
    offset: int  # bytes of the .npy header, before the data
    data_bytes: int  # what the header declares

    def described(self) -> str:
        return f"{self.header.shape} {self.header.dtype}, {self.data_bytes:,} bytes"


def read_npz_headers(path: Path, max_expanded_bytes: int | None = None) -> list[ArrayHeader]:
    """Headers of every array in ``path``, once its members are checked against them;
    refuses pickled objects, non-numeric dtypes, more unpacked bytes than
    ``max_expanded_bytes`` (None: no limit) and members that do not hold what their
    headers declare."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _members(archive)
            members = [_header(archive, info) for info in infos]
            _check_total(members, max_expanded_bytes)
            for info, member in zip(infos, members, strict=True):
                _check_data(archive, info, member)
            return [m.header for m in members]
    except _UNREADABLE as exc:
        raise InvalidRequest(
            f"dataset is not a valid .npz file ({type(exc).__name__}: {str(exc)[:200]}); "
            "write it with numpy.savez"
        ) from None


def _members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > MAX_ARRAYS:
        raise InvalidRequest(f"dataset holds {len(infos)} arrays; the limit is {MAX_ARRAYS}")
    seen: set[str] = set()
    for info in infos:
        if info.filename in seen:
            raise InvalidRequest(
                f"dataset holds {shown(info.filename)} twice; an .npz names each array once"
            )
        seen.add(info.filename)
    return infos


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise InvalidRequest(
            f"array {shown(name)} holds Python objects; only numeric arrays are allowed"
        )
    if dtype.name not in WIRE_DTYPES:
        raise InvalidRequest(
            f"array {shown(name)} has dtype {dtype.name}; expected one of {', '.join(WIRE_DTYPES)}"
        )
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"array {shown(name)} has a negative dimension in its shape {dims}")
    header = ArrayHeader(name=name, dtype=dtype.name, shape=dims)
    return _Member(header, offset, math.prod(dims) * dtype.itemsize)


def _check_total(members: list[_Member], limit: int | None) -> None:
    """Refuse, before decompressing anything, arrays that declare more than ``limit``."""
    total = sum(m.data_bytes for m in members)
    if limit is None or total <= limit or not members:
        return
    largest = max(members, key=lambda m: m.data_bytes)
    raise ResourceExhausted(
        f"the dataset's arrays hold {total:,} bytes unpacked (largest: "
        f"{shown(largest.header.name)}, {largest.header.shape} {largest.header.dtype}); the "
        f"limit is {limit:,} bytes (FITSERVE_MAX_DATASET_EXPANDED_BYTES)"
    )


def _check_data(archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: _Member) -> None:
    """Stream one member through the decompressor, counting its bytes: exactly what its
    header declares, and never more read than one chunk past that."""
    expected = member.offset + member.data_bytes
    name = shown(member.header.name)
    got = info.file_size  # what the zip's directory says, checked by reading below
    if got == expected:
        with archive.open(info) as f:
            got = _count(f, expected)  # zipfile checks the CRC at the end
    if got > expected:
        raise InvalidRequest(
            f"array {name} holds more data than its header declares ({member.described()}); "
            "write it with numpy.savez"
        )
    if got < expected:
        raise InvalidRequest(
            f"array {name} holds {max(got - member.offset, 0):,} bytes of data; its header "
            f"declares {member.described()} (cut short?)"
        )


def _count(f: IO[bytes], expected: int) -> int:
    """Bytes in ``f``, read a chunk at a time, stopping once past ``expected``."""
    got = 0
    while chunk := f.read(CHUNK_BYTES):
        got += len(chunk)
        if got > expected:
            break
    return got
