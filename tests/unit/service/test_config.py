"""Settings read from the environment."""

from __future__ import annotations

import pydantic
import pytest

from service.config import Settings


def test_finished_jobs_are_kept_thirty_days_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FITSERVE_JOB_RETENTION_SECONDS", raising=False)
    assert Settings().job_retention_seconds == 30 * 24 * 3600


@pytest.mark.parametrize(("value", "retention"), [("3600", 3600), ("null", None)])
def test_the_job_retention_is_set_or_turned_off_by_its_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, retention: int | None
) -> None:
    monkeypatch.setenv("FITSERVE_JOB_RETENTION_SECONDS", value)
    assert Settings().job_retention_seconds == retention


@pytest.mark.parametrize("value", ["0", "-5", "a month"])
def test_a_retention_that_is_not_a_positive_number_of_seconds_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FITSERVE_JOB_RETENTION_SECONDS", value)
    with pytest.raises(pydantic.ValidationError, match="job_retention_seconds"):
        Settings()


def test_null_unsets_a_nested_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().inference.max_queue_wait_ms == 100.0  # load shedding on by default
    monkeypatch.setenv("FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS", "null")
    assert Settings().inference.max_queue_wait_ms is None  # off


def test_job_requests_are_capped_at_one_mib_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_job_request_bytes == 1024 * 1024
    monkeypatch.setenv("FITSERVE_MAX_JOB_REQUEST_BYTES", "65536")
    assert Settings().max_job_request_bytes == 65536


def test_job_time_limits_default_to_a_day_at_most_46_hours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = Settings().job_time_limit
    assert (limits.default_seconds, limits.max_seconds) == (24 * 3600, 46 * 3600)
    assert limits.resolve(None) == 24 * 3600
    assert limits.resolve(60) == 60

    monkeypatch.setenv("FITSERVE_JOB_TIME_LIMIT__DEFAULT_SECONDS", "null")
    monkeypatch.setenv("FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS", "3600")
    limits = Settings().job_time_limit
    assert limits.resolve(None) == 3600  # no default: the maximum

    monkeypatch.setenv("FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS", "null")
    assert Settings().job_time_limit.resolve(None) is None  # no limit at all


def test_a_default_time_limit_over_the_maximum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FITSERVE_JOB_TIME_LIMIT__DEFAULT_SECONDS", "7200")
    monkeypatch.setenv("FITSERVE_JOB_TIME_LIMIT__MAX_SECONDS", "3600")
    with pytest.raises(pydantic.ValidationError, match="default_seconds 7200 is over max_seconds"):
        Settings()
