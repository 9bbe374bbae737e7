"""Reads .npz array headers without loading the arrays."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.domain.dtypes import WIRE_DTYPES
from service.errors import InvalidRequest


@dataclass(frozen=True)
class ArrayHeader:
    """Name, dtype and shape of one array in an .npz file."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def read_npz_headers(path: Path) -> list[ArrayHeader]:
    """Headers of every array in ``path``; refuses pickled objects and non-numeric dtypes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [_header(archive, member) for member in archive.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidRequest(
            f"dataset is not a valid .npz file ({exc}); write it with numpy.savez"
        ) from None


def _header(archive: zipfile.ZipFile, member: str) -> ArrayHeader:
    name = member.removesuffix(".npy")
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise InvalidRequest(
            f"array {name!r} holds Python objects; only numeric arrays are allowed"
        )
    if dtype.name not in WIRE_DTYPES:
        raise InvalidRequest(
            f"array {name!r} has dtype {dtype.name}; expected one of {', '.join(WIRE_DTYPES)}"
        )
    return ArrayHeader(name=name, dtype=dtype.name, shape=tuple(int(d) for d in shape))
