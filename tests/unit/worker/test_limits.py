"""The hard backstop's time limit, from the settings and the Celery version."""

import pytest

from service.config import JobTimeLimitSettings, Settings
from worker import limits


def settings(**limit: int | None) -> Settings:
    return Settings(job_time_limit=JobTimeLimitSettings(**limit))  # type: ignore[arg-type]


def test_the_backstop_is_the_maximum_plus_the_grace():
    assert limits.hard_time_limit(settings()) == 46 * 3600 + 900
    assert limits.hard_time_limit(settings(max_seconds=60, default_seconds=30)) == 960
    limit = settings(max_seconds=2, default_seconds=2, backstop_grace_seconds=3)
    assert limits.hard_time_limit(limit) == 5


def test_no_maximum_means_no_backstop():
    assert limits.hard_time_limit(settings(max_seconds=None)) is None


def test_no_backstop_with_a_celery_that_would_leave_the_job_running(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(limits.celery, "VERSION", (5, 6, 2, "", ""))
    assert limits.hard_time_limit(settings()) is None
