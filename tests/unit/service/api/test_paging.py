"""Paging of the List RPCs: tokens are offsets this server issued."""

from __future__ import annotations

import pytest

from service.api.paging import DEFAULT_PAGE, MAX_PAGE, Page, next_token, page
from service.errors import InvalidRequest


def test_pages_walk_the_items_in_order_and_the_last_has_no_next_token() -> None:
    items = list(range(7))
    seen, tokens, token = [], [], ""
    while True:
        chunk, token = page(3, token).of(items)
        seen.append(list(chunk))
        tokens.append(token)
        if not token:
            break
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    assert tokens == ["3", "6", ""]


def test_a_page_ending_exactly_at_the_end_has_no_next_token() -> None:
    assert Page(3, 3).of(list(range(6))) == ([3, 4, 5], "")
    assert Page(10, 3).of(list(range(6))) == ([], "")
    assert Page(0, DEFAULT_PAGE).of([]) == ([], "")


def test_defaults_and_tokens() -> None:
    assert (DEFAULT_PAGE, MAX_PAGE) == (50, 1000)
    assert page(0, "") == Page(0, DEFAULT_PAGE)
    assert page(MAX_PAGE, "40") == Page(40, MAX_PAGE)
    assert (next_token(0), next_token(12)) == ("", "12")


@pytest.mark.parametrize(
    ("size", "token", "field", "message"),
    [
        (-1, "", "page_size", "page_size must be 1..1000"),
        (MAX_PAGE + 1, "", "page_size", "page_size must be 1..1000"),
        (10, "abc", "page_token", "page_token is not one this server issued"),
        (10, "-5", "page_token", "page_token is not one this server issued"),
    ],
)
def test_bad_page_requests_name_the_field(size: int, token: str, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        page(size, token)
    assert (err.value.field, err.value.message) == (field, message)
    assert err.value.code == "INVALID_ARGUMENT"
