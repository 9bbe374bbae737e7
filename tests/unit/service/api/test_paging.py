"""Paging of the List RPCs: tokens are offsets this server issued."""

from __future__ import annotations

import pytest

from fitserve.v1 import training_pb2
from service.api.paging import DEFAULT_PAGE, MAX_PAGE, Page, enum_filter, next_token, page
from service.errors import InvalidRequest

TOKEN_REFUSED = (
    "page_token is not one this server issued; send the next_page_token of the previous "
    "page, or nothing for the first page"
)


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
        (10, "abc", "page_token", TOKEN_REFUSED),
        (10, "-5", "page_token", TOKEN_REFUSED),
        (10, "²", "page_token", TOKEN_REFUSED),  # str.isdigit says yes, int() says no
        (10, "\u0661\u0662", "page_token", TOKEN_REFUSED),  # Arabic-Indic 12: int() reads it
        (10, "9" * 16, "page_token", TOKEN_REFUSED),  # beyond Redis's 64-bit offsets
    ],
)
def test_bad_page_requests_name_the_field(size: int, token: str, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        page(size, token)
    assert (err.value.field, err.value.message) == (field, message)
    assert err.value.code == "INVALID_ARGUMENT"


def test_the_longest_token_is_still_read() -> None:
    assert page(10, "9" * 15) == Page(10**15 - 1, 10)


def test_enum_filters_read_defined_values_and_unspecified_as_no_filter() -> None:
    state = training_pb2.JobState
    assert enum_filter(state, state.JOB_STATE_RUNNING, "state", "JOB_STATE_", "job state") == (
        "RUNNING"
    )
    assert enum_filter(state, 0, "state", "JOB_STATE_", "job state") == ""


def test_an_enum_value_the_enum_does_not_define_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(InvalidRequest) as err:
        enum_filter(training_pb2.JobState, 99, "state", "JOB_STATE_", "job state")
    assert err.value.field == "state"
    assert err.value.message.startswith(
        "state 99 is not a job state; valid: QUEUED, RUNNING, SUCCEEDED, FAILED"
    )
    assert err.value.message.endswith("(or unset for all)")
