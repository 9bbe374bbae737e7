"""The benchmark report: ratios against targets, computed from raw results."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from bench import report
from bench.authcost import per_call_us
from bench.loadgen import auth_metadata, summarize


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


def _auth_round(first: str, off: tuple[float, ...], on: tuple[float, ...]) -> dict[str, Any]:
    """One paired round: (64-caller rps, 1-caller p50[, 64-caller server CPU µs per call])
    with auth off and on."""

    def side(rps: float, p50: float, cpu_us: float = 300.0) -> list[dict[str, Any]]:
        return [
            {**_point(64, rps, 20.0, 30.0), "ok": 10_000, "errors": {},
             "server_cpu_s": cpu_us * 1e-6 * 10_000},
            {**_point(1, 1200.0, p50, 1.2), "ok": 2400, "errors": {}, "server_cpu_s": 0.9},
        ]  # fmt: skip

    return {"first": first, "off": side(*off), "on": side(*on)}


def _auth_checks(
    rounds: list[dict[str, Any]], without_token: str, inprocess: dict[str, float] | None = None
) -> dict[str, report.Check]:
    results = {"rounds": rounds, "without_token": without_token, "inprocess": inprocess}
    return {c.case: c for c in report.auth_checks(results)}


def test_auth_checks_take_the_median_of_paired_rounds() -> None:
    rounds = [
        _auth_round("off", off=(3000, 0.80, 300), on=(2970, 0.82, 303)),  # 0.99, +0.02 ms, 1.01
        _auth_round("on", off=(2000, 0.90, 300), on=(1800, 1.00, 360)),  # 0.90, +0.1 ms, 1.2
        _auth_round("off", off=(3100, 0.70, 300), on=(3069, 0.73, 306)),  # 0.99, +0.03 ms, 1.02
    ]
    checks = _auth_checks(rounds, "UNAUTHENTICATED", {"on_us": 2.5, "off_us": 0.5})
    rps = checks["auth on / auth off, 64 callers, 1 row: rps"]
    assert (rps.value, rps.target, rps.verdict) == (pytest.approx(0.99), 0.97, "PASS")
    p50 = checks["auth on - auth off, 1 caller, 1 row: p50"]
    assert (p50.value, p50.target, p50.verdict) == (pytest.approx(0.03), 0.05, "PASS")
    cpu = checks["auth on / auth off, 64 callers: server CPU per call"]
    assert (cpu.value, cpu.target, cpu.verdict) == (pytest.approx(1.02), 1.03, "PASS")
    check = checks["auth on - auth off, in-process token check: per call"]
    assert (check.value, check.target, check.verdict) == (pytest.approx(2.0), 10.0, "PASS")
    assert checks["auth on: calls with the predictor token refused"].verdict == "PASS"
    assert checks["auth on: a call without a token refused UNAUTHENTICATED"].verdict == "PASS"


def test_auth_checks_miss_when_the_token_is_refused_or_auth_is_not_on() -> None:
    refused = _auth_round("off", off=(3000, 0.8), on=(0, 0.8))
    refused["on"][0] |= {"errors": {"UNAUTHENTICATED": 500}, "p50_ms": None}
    refused["on"][1] |= {"errors": {"RESOURCE_EXHAUSTED": 7}}  # shed: not the token's fault
    checks = _auth_checks([refused], "OK")
    assert checks["auth on / auth off, 64 callers, 1 row: rps"].value == 0.0
    failed = checks["auth on: calls with the predictor token refused"]
    assert (failed.value, failed.verdict) == (500.0, "MISS")
    assert checks["auth on: a call without a token refused UNAUTHENTICATED"].verdict == "MISS"


def test_auth_checks_have_no_value_without_latencies_or_server_cpu() -> None:
    empty = _auth_round("off", off=(3000, 0.8), on=(3000, 0.8))
    empty["on"][1]["p50_ms"] = None
    del empty["off"][0]["server_cpu_s"]
    checks = _auth_checks([empty], "UNAUTHENTICATED")
    assert checks["auth on - auth off, 1 caller, 1 row: p50"].verdict == "MISS (no data)"
    cpu = checks["auth on / auth off, 64 callers: server CPU per call"]
    assert cpu.verdict == "MISS (no data)"
    check = checks["auth on - auth off, in-process token check: per call"]
    assert check.verdict == "MISS (no data)"


def test_server_cpu_per_call_counts_answered_and_refused_calls() -> None:
    run = {"ok": 3000, "errors": {"RESOURCE_EXHAUSTED": 1000}, "server_cpu_s": 1.2}
    assert report.cpu_per_call_us(run) == pytest.approx(300)
    assert report.cpu_per_call_us(run | {"ok": 0, "errors": {}}) is None
    assert report.cpu_per_call_us({"ok": 4000, "errors": {}}) is None


def test_the_load_generator_sends_the_token_as_bearer_metadata() -> None:
    assert auth_metadata("fst_abc") == (("authorization", "Bearer fst_abc"),)
    assert auth_metadata(None) is None
    assert auth_metadata("") is None


def test_the_in_process_token_check_takes_the_fastest_loop() -> None:
    assert per_call_us([0.050, 0.030, 0.090], number=10_000) == pytest.approx(3.0)
