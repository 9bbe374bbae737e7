"""Request ids: unique, time-ordered, and their age readable on any replica."""

from __future__ import annotations

import time

from service.logs import new_request_id, request_id_age


def test_request_ids_carry_their_age_and_sort_by_time() -> None:
    first = new_request_id()
    time.sleep(0.002)  # ids are millisecond-ordered: step past one millisecond
    second = new_request_id()
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert first < second
    age = request_id_age(first)
    assert age is not None
    assert 0 <= age < 5


def test_ids_of_another_form_have_no_age() -> None:
    assert request_id_age("abc") is None
    assert request_id_age("z" * 32) is None
    assert len({new_request_id() for _ in range(1000)}) == 1000
