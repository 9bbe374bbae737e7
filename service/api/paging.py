"""Paging of the List RPCs (ListDatasets, ListModels, ListJobs): one meaning for
``page_size`` and ``page_token`` everywhere.

A page token is the offset of the page's first item, as this server issued it; clients
treat it as opaque. An empty next token means there is no further page. A token is ASCII
digits only (``str.isdigit`` also takes "²" and Arabic-Indic digits), at most
``MAX_TOKEN_DIGITS`` of them: an offset far past any listing and well inside the 64-bit
range Redis reads.

The List RPCs' enum filters (ListJobs ``state`` and ``kind``) are read by ``enum_filter``,
which refuses a number the enum does not define.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from service.errors import InvalidRequest

MAX_PAGE = 1000
DEFAULT_PAGE = 50
MAX_TOKEN_DIGITS = 15
T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    """Where a requested page starts and how many items it holds at most."""

    offset: int
    size: int

    def of(self, items: Sequence[T]) -> tuple[Sequence[T], str]:
        """This page of ``items`` (all of them, in order) and the next page's token."""
        end = self.offset + self.size
        return items[self.offset : end], next_token(end if end < len(items) else 0)


def page(page_size: int, page_token: str) -> Page:
    """The page a request asks for; INVALID_ARGUMENT for a size out of range or a token
    this server did not issue."""
    if page_size < 0 or page_size > MAX_PAGE:
        raise InvalidRequest(f"page_size must be 1..{MAX_PAGE}", field="page_size")
    if page_token and not (
        len(page_token) <= MAX_TOKEN_DIGITS and page_token.isascii() and page_token.isdigit()
    ):
        raise InvalidRequest(
            "page_token is not one this server issued; send the next_page_token of the "
            "previous page, or nothing for the first page",
            field="page_token",
        )
    return Page(int(page_token or 0), page_size or DEFAULT_PAGE)


def enum_filter(enum: Any, number: int, field: str, prefix: str, what: str) -> str:
    """An enum filter's value by name without ``prefix`` ("" for UNSPECIFIED: no filter);
    INVALID_ARGUMENT naming the valid values for a number the enum does not define (proto3
    keeps unknown enum numbers as they are). ``enum``: a generated enum, such as
    ``training_pb2.JobState`` (its ``Name`` and ``items``)."""
    try:
        name = enum.Name(number).removeprefix(prefix)
    except ValueError:
        valid = ", ".join(
            k.removeprefix(prefix) for k, _ in enum.items() if not k.endswith("UNSPECIFIED")
        )
        raise InvalidRequest(
            f"{field} {number} is not a {what}; valid: {valid} (or unset for all)", field=field
        ) from None
    return "" if name == "UNSPECIFIED" else name


def next_token(offset: int) -> str:
    """The token of the page starting at ``offset``; "" (no next page) for 0."""
    return str(offset) if offset else ""
