"""The benchmark report: ratios against targets, computed from raw results."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import report
from bench.loadgen import summarize


def test_a_check_passes_or_misses_against_its_target() -> None:
    assert report.Check("x", 0.95, ">=", 0.90).verdict == "PASS"
    assert report.Check("x", 0.85, ">=", 0.90).verdict == "MISS"
    assert report.Check("x", 1.6, "<=", 1.5).verdict == "MISS"
    assert report.Check("x", None, "<=", 1.5).verdict == "MISS (no data)"


def test_summarize_reports_percentiles_and_throughput() -> None:
    latencies = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    result = summarize(
        latencies, Counter({"RESOURCE_EXHAUSTED": 3}), rows=4, duration=2.0, callers=8
    )
    assert result["rps"] == 50.0
    assert result["samples_per_s"] == 200.0
    assert result["p50_ms"] == pytest.approx(50.5)
    assert result["p99_ms"] == pytest.approx(99.01)
    assert result["errors"] == {"RESOURCE_EXHAUSTED": 3}


def test_training_checks_compare_steady_epochs_and_overheads() -> None:
    results = {
        "samples": 1000, "epochs": 3,
        "plain": {"fit_start": 0.0, "fit_end": 3.0, "epoch_ends": [1.0, 2.0, 3.0], "accuracy": 0.9},
        "fitserve": {"called": 10.0, "returned": 10.1, "epoch_ends": [11.2, 12.4, 13.6],
                     "done": 14.0, "accuracy": 0.901},
        "rss": {"jobs": 3, "rss_mb": [500.0, 540.0, 510.0]},  # a child replaced after job 2
    }  # fmt: skip
    checks = {c.case.split(":")[0]: c.value for c in report.training_checks(results)}
    assert checks["fit throughput"] == pytest.approx(2.0 / 2.4)  # 2000 samples in 2.0 s vs 2.4 s
    assert checks["Train return -> first epoch starting (idle warm worker)"] == pytest.approx(0.1)
    assert checks["whole job - plain fit time"] == pytest.approx(1.0)
    assert checks["accuracy"] == pytest.approx(0.1)
    assert checks["3 consecutive jobs"] == pytest.approx(40.0)  # the peak


def _point(callers: int, rps: float, p50: float, p99: float) -> dict[str, float]:
    return {"callers": callers, "rps": rps, "p50_ms": p50, "p99_ms": p99}


def test_serving_checks_hold_every_target_of_the_readme() -> None:
    results = {
        "sweep": {
            "echo": [_point(1, 2000, 0.4, 0.6), _point(64, 6000, 10.0, 12.0)],
            "naive": [_point(1, 1500, 0.5, 0.8), _point(64, 2000, 30.0, 40.0)],
            "fitserve": [_point(1, 1400, 0.7, 1.0), _point(64, 3000, 20.0, 36.0)],
        },
        "rows512": {k: {"samples_per_s": v} for k, v in
                    (("echo", 100_000), ("naive", 90_000), ("fitserve", 81_000))},
        "overload": {"errors": {"RESOURCE_EXHAUSTED": 5}, "p99_ms": 60.0,
                     "rss_before_mb": 100.0, "rss_after_mb": 101.0},
        "alias_switch": {"errors": {}, "p99_ms": 45.0},
    }  # fmt: skip
    checks = {c.case: c for c in report.serving_checks(results)}
    assert checks["64 callers, 1 row: fitserve rps / transport ceiling"].value == 0.5
    assert checks["64 callers, 1 row: fitserve p99 / fitserve p50"].value == pytest.approx(1.8)
    lone = checks["1 caller, 1 row: fitserve p50 - naive p50"]
    assert (lone.value, lone.target, lone.verdict) == (pytest.approx(0.2), 0.15, "MISS")
    assert checks["16 callers, 512 rows: fitserve samples/s / transport ceiling"].verdict == "PASS"
    naive512 = checks["16 callers, 512 rows: fitserve samples/s / naive server"]
    assert (naive512.value, naive512.verdict) == (pytest.approx(0.9), "MISS")
    assert checks["alias switch: p99 / p99 without switches"].value == pytest.approx(1.25)
