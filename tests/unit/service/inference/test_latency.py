"""The latency-target controller as pure logic: synthetic latencies in, batch timeouts out."""

import asyncio

import numpy as np
import pytest

from service.config import BatchingOverride, BatchingSettings
from service.inference.batcher import Batcher, BatchPolicy, BatchStats
from service.inference.latency import LatencyTarget

MS = 0.001
TARGET = 20 * MS


def test_fast_requests_grow_the_timeout_step_by_step_up_to_half_the_target() -> None:
    c = LatencyTarget(TARGET, timeout=1 * MS)
    timeouts = [c.observe([2 * MS] * 200) for _ in range(60)]

    assert timeouts[0] == pytest.approx(1.4 * MS)  # one full window: one step of 2 % of 20 ms
    assert timeouts == sorted(timeouts)
    assert timeouts[-1] == pytest.approx(c.max_timeout) == pytest.approx(10 * MS)


def test_a_window_is_judged_once_it_is_full() -> None:
    c = LatencyTarget(TARGET, timeout=1 * MS)
    assert c.observe([2 * MS] * 199) == 1 * MS
    assert c.observe([2 * MS]) == pytest.approx(1.4 * MS)


def test_latencies_between_80_and_100_percent_of_the_target_hold_the_timeout() -> None:
    c = LatencyTarget(TARGET, timeout=5 * MS)
    for _ in range(10):
        assert c.observe([18 * MS] * 200) == 5 * MS


def test_more_than_one_percent_over_the_target_halves_the_timeout_at_once() -> None:
    c = LatencyTarget(TARGET, timeout=8 * MS)
    assert c.observe([2 * MS] * 50 + [30 * MS] * 2) == 8 * MS  # 2 of a 200-window: p99 holds
    assert c.observe([30 * MS]) == 4 * MS  # the third: p99 is over, no need to wait
    assert c.observe([30 * MS] * 3) == 2 * MS  # a new window judged on its own


def test_the_timeout_stays_within_zero_and_half_the_target() -> None:
    assert LatencyTarget(TARGET, timeout=50 * MS).timeout == 10 * MS
    c = LatencyTarget(TARGET, timeout=1 * MS)
    for _ in range(40):
        c.observe([1.0] * 3)
    assert 0 <= c.timeout < 1e-9
    assert c.observe([1 * MS] * 200) == pytest.approx(0.4 * MS)  # and it grows back


def test_it_settles_where_p99_is_under_the_target_and_backs_off_when_load_rises() -> None:
    """A synthetic server: latency = 1 ms + 2 x timeout + load-dependent jitter."""
    rng = np.random.default_rng(0)
    c = LatencyTarget(TARGET, timeout=1 * MS)

    def run(batches: int, jitter: float) -> list[float]:
        seen: list[float] = []
        for _ in range(batches):
            batch = list(1 * MS + 2 * c.timeout + rng.exponential(jitter, 16))
            seen += batch
            c.observe(batch)
        return seen

    run(2000, jitter=1 * MS)  # settle
    calm = run(2000, jitter=1 * MS)
    assert np.percentile(calm, 99) <= TARGET
    assert c.timeout >= 4 * MS  # batches as long as the budget allows, not at the floor

    calm_timeout = c.timeout
    run(500, jitter=4 * MS)  # the load rises: same timeout, slower requests
    busy = run(2000, jitter=4 * MS)
    assert c.timeout < calm_timeout
    assert np.percentile(busy, 99) <= TARGET


def test_the_batcher_adapts_its_timeout_when_it_has_a_target() -> None:
    seen: list[BatchStats] = []
    policy = BatchPolicy(max_batch_size=8, batch_timeout=1 * MS, latency_target=10.0)
    batcher = Batcher(lambda x: x, policy, on_batch=seen.append)

    async def lone_requests() -> None:
        for _ in range(400):
            await batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1)

    try:
        asyncio.run(lone_requests())
    finally:
        batcher.close()
    assert seen[0].batch_timeout == 1 * MS
    assert seen[-1].batch_timeout == pytest.approx(1 * MS + 2 * 0.02 * 10.0)  # two windows


def test_a_model_can_set_its_own_target() -> None:
    b = BatchingSettings(
        latency_target_ms=50, models={"fast": BatchingOverride(latency_target_ms=5)}
    )
    assert b.for_model("fast").latency_target_ms == 5
    assert b.for_model("other").latency_target_ms == 50
    assert BatchingSettings().latency_target_ms is None
