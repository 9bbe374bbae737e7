"""Validation of the names users give models, datasets and aliases."""

from __future__ import annotations

import re

from service.errors import InvalidRequest, shown

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_ALIAS = re.compile(r"[a-z][a-z0-9._-]{0,62}")
RESERVED_ALIASES = frozenset({"latest"})


def check_name(value: str, field: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid model or dataset name, else raise InvalidRequest."""
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"{field} {shown(value)} is not a valid {what}: use 1-63 characters of a-z, 0-9, "
            "'.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return value


def check_alias(value: str, field: str = "alias") -> str:
    """Return ``value`` if it is a valid alias, else raise InvalidRequest."""
    if not _ALIAS.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"{field} {shown(value)} is not a valid alias: use 1-63 characters of a-z, 0-9, "
            "'.', '_' or '-', starting with a letter",
            field=field,
        )
    if value in RESERVED_ALIASES:
        raise InvalidRequest(f"alias {value!r} is reserved", field=field)
    return value
