"""How a call that ended without an answer is counted: by its deadline, or cancelled."""

from __future__ import annotations

from typing import Any, cast

import pytest

from service.api.status import DEADLINE_SLACK_SECONDS, gone_code


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(
    ("remaining", "code"),
    [
        (None, "CANCELLED"),  # no deadline: only the client ends it
        (30.0, "CANCELLED"),
        (DEADLINE_SLACK_SECONDS + 0.01, "CANCELLED"),
        (0.0009, "DEADLINE_EXCEEDED"),  # gRPC's timer ended it 1 ms early, as measured
        (0.0, "DEADLINE_EXCEEDED"),
    ],
)
def test_gone_code(remaining: float | None, code: str) -> None:
    assert gone_code(cast(Any, _Context(remaining))) == code
