"""Latency-target batching: hold a version's p99 latency under a target, batching as much
as that allows.

A longer batch timeout makes larger batches (fewer model calls and thread hand-offs per
request, so more requests per second) but makes a request wait longer. The best timeout
depends on the load and the model, so instead of a fixed ``batch_timeout_ms`` the operator
states the latency they can afford (``latency_target_ms``) and ``LatencyTarget`` finds the
timeout, by AIMD as in TCP congestion control:

* The batcher reports every request's latency inside it (queued, waiting for the batch to
  fill, computed: what the batch timeout can change) once per batch.
* Latencies are judged in windows of ``window`` requests. A full window whose p99 is under
  ``grow_below`` x target adds ``step`` x target to the timeout (slow growth); a window
  whose p99 is over the target halves it. A window does not have to fill to back off: as
  soon as more than 1 % of a window's requests are over the target, its p99 is, so the
  timeout halves at once. Each decision starts a new window, so one slow moment is
  judged once, not once per later batch.
* The timeout stays between 0 and ``max_share`` x target: waiting is never worth most of
  the budget.

Pure logic over the latencies it is given (no clock, no threads), so it is tested by
feeding it synthetic latencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class LatencyTarget:
    """The batch timeout that keeps the p99 latency under ``target`` seconds."""

    target: float
    timeout: float
    window: int = 200
    grow_below: float = 0.8
    step: float = 0.02
    backoff: float = 0.5
    max_share: float = 0.5
    _latencies: list[float] = field(default_factory=list, repr=False)
    _over: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.timeout = min(max(self.timeout, 0.0), self.max_timeout)

    @property
    def max_timeout(self) -> float:
        """The longest timeout this controller will set."""
        return self.target * self.max_share

    def observe(self, latencies: Iterable[float]) -> float:
        """Take the latencies of one batch's requests; returns the timeout to use next."""
        for latency in latencies:
            self._latencies.append(latency)
            self._over += latency > self.target
        if self._over > self.window // 100:
            self._decide(shrink=True)
        elif len(self._latencies) >= self.window:
            p99 = _quantile(self._latencies, 0.99)
            self._decide(shrink=p99 > self.target, grow=p99 < self.grow_below * self.target)
        return self.timeout

    def _decide(self, *, shrink: bool, grow: bool = False) -> None:
        if shrink:
            self.timeout *= self.backoff
        elif grow:
            self.timeout = min(self.timeout + self.step * self.target, self.max_timeout)
        self._latencies.clear()
        self._over = 0


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile: the smallest value at or above a share ``q`` of them."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]
