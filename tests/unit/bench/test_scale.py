"""The arithmetic of the scale measurements (bench/scale.py), without Redis or servers."""

from __future__ import annotations

import random

import pytest

from bench import scale


def test_percentiles_are_in_milliseconds_with_the_count() -> None:
    result = scale.percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert result["n"] == 100
    assert result["p50_ms"] == pytest.approx(50.5)
    assert result["p99_ms"] == pytest.approx(99.01)
    assert result["max_ms"] == pytest.approx(100.0)


def test_percentiles_of_nothing_are_none() -> None:
    assert scale.percentiles([]) == {
        "n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None
    }  # fmt: skip


def test_per_unit_divides_the_growth() -> None:
    assert scale.per_unit(1000, 9000, 4) == 2000.0
    assert scale.per_unit(1000, 9000, 0) is None


def test_dataset_bytes_leaves_out_the_aof_buffer() -> None:
    assert scale.dataset_bytes({"used_memory": 10_000, "mem_aof_buffer": 1_500}) == 8_500
    assert scale.dataset_bytes({"used_memory": 10_000}) == 10_000


def test_command_delta_is_per_unit_and_skips_info() -> None:
    before = {"cmdstat_hset": {"calls": 10, "usec": 100}, "cmdstat_info": {"calls": 1, "usec": 5}}
    after = {
        "cmdstat_hset": {"calls": 30, "usec": 300},
        "cmdstat_xadd": {"calls": 10, "usec": 50},
        "cmdstat_info": {"calls": 9, "usec": 50},
        "cmdstat_get": {"calls": 0, "usec": 0},
    }
    assert scale.command_delta(before, after, per=10) == {
        "hset": {"calls": 2.0, "usec": 20.0},
        "xadd": {"calls": 1.0, "usec": 5.0},
    }


def test_epoch_logs_have_what_a_classifier_with_validation_records() -> None:
    logs = scale.epoch_logs(random.Random(0))
    assert set(logs) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}


def test_placement_is_balanced_only_when_every_process_has_a_connection() -> None:
    assert scale.placement({1: 1, 2: 1}) == "balanced"
    assert scale.placement({1: 2, 2: 0}) == "skewed"
    assert scale.placement({}) == "skewed"
