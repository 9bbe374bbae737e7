"""Job statistics from Redis's hash to Prometheus families."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.job_metrics import JobStatsCollector

STATS = {
    "finished:TRAIN:SUCCEEDED": "3",
    "finished:TRAIN:FAILED": "1",
    "running:TRAIN": "2",
    "run:TRAIN:5": "1",
    "run:TRAIN:10": "3",
    "run:TRAIN:30": "4",
    "run:TRAIN:+Inf": "4",
    "run_sum:TRAIN": "41.5",
}


def _registry(read: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobStatsCollector(read))  # type: ignore[arg-type]
    return registry


def test_counts_gauges_and_histograms_are_exported() -> None:
    r = _registry(lambda: STATS)
    assert (
        r.get_sample_value(
            "fitserve_jobs_finished_total", {"kind": "TRAIN", "outcome": "SUCCEEDED"}
        )
        == 3
    )
    assert r.get_sample_value("fitserve_jobs_running", {"kind": "TRAIN"}) == 2
    assert (
        r.get_sample_value("fitserve_job_run_seconds_bucket", {"kind": "TRAIN", "le": "1.0"}) == 0
    )
    assert (
        r.get_sample_value("fitserve_job_run_seconds_bucket", {"kind": "TRAIN", "le": "10.0"}) == 3
    )
    assert (
        r.get_sample_value("fitserve_job_run_seconds_bucket", {"kind": "TRAIN", "le": "+Inf"}) == 4
    )
    assert r.get_sample_value("fitserve_job_run_seconds_sum", {"kind": "TRAIN"}) == 41.5
    assert r.get_sample_value("fitserve_job_run_seconds_count", {"kind": "TRAIN"}) == 4


def test_a_failing_read_gives_an_empty_scrape_not_an_error() -> None:
    def broken() -> dict[str, str]:
        raise ConnectionError("redis down")

    r = _registry(broken)
    assert r.get_sample_value("fitserve_jobs_running", {"kind": "TRAIN"}) is None
