"""The soak's checks (bench/soak.py): pure functions over what it recorded."""

from __future__ import annotations

from bench.soak import Fault, outside_faults, rss_check, stream_check


def test_a_stream_seen_whole_passes_and_gaps_duplicates_or_extras_fail() -> None:
    final = ["1-0", "2-0", "3-0"]
    assert stream_check(["1-0", "2-0", "3-0"], final) == ""
    assert "duplicate" in stream_check(["1-0", "2-0", "2-0", "3-0"], final)
    assert "1 events missed ['2-0']" in stream_check(["1-0", "3-0"], final)
    assert "1 not in the stream" in stream_check(["1-0", "2-0", "3-0", "4-0"], final)
    assert stream_check(["2-0", "1-0", "3-0"], final) != ""  # out of order


def test_predict_errors_pass_only_when_unavailable_within_a_fault_window() -> None:
    faults = [Fault("restart_server", start=10.0, end=14.0)]
    assert outside_faults([(10.5, "UNAVAILABLE"), (30.0, "UNAVAILABLE")], faults, 20.0) == []
    assert outside_faults([(35.0, "UNAVAILABLE")], faults, 20.0) == [(35.0, "UNAVAILABLE")]
    assert outside_faults([(9.0, "UNAVAILABLE")], faults, 20.0) == [(9.0, "UNAVAILABLE")]
    assert outside_faults([(11.0, "INTERNAL")], faults, 20.0) == [(11.0, "INTERNAL")]
    assert outside_faults([(12.0, "RESOURCE_EXHAUSTED")], faults, 20.0) == []  # shed, warming
    assert outside_faults([(50.0, "RESOURCE_EXHAUSTED")], faults, 20.0) == [
        (50.0, "RESOURCE_EXHAUSTED")
    ]
    assert outside_faults([(1.0, "UNAVAILABLE")], [], 20.0) == [(1.0, "UNAVAILABLE")]


def test_rss_is_flat_when_no_process_peaks_past_the_bound_of_the_first() -> None:
    mb = 2**20
    assert rss_check({1: [100 * mb, 110 * mb], 2: [120 * mb]}, 1.3) == (True, 100 * mb, 120 * mb)
    assert rss_check({1: [100 * mb], 2: [90 * mb, 140 * mb]}, 1.3)[0] is False
    assert rss_check({}, 1.3) == (False, 0, 0)  # nothing measured is not a pass
