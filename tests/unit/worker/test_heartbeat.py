"""A worker main process's heartbeat against a real Redis: its keys per queue and its
process's alive key (which the reaper reads for jobs the worker received), renewed with
their TTL and deleted at a clean stop."""

from __future__ import annotations

import os
import time

import redis

from service.config import Settings
from service.domain.jobs import alive_key, worker_process
from service.job_metrics import heartbeat_key
from worker.metrics import WorkerMetrics

DB = 10


def test_the_heartbeat_keeps_the_alive_key_and_deletes_it_at_a_clean_stop(
    url: str, r: redis.Redis
) -> None:
    settings = Settings(
        redis_url=url, worker_heartbeat_seconds=0.2, worker_heartbeat_ttl_seconds=0.6
    )
    metrics = WorkerMetrics(settings)
    metrics.hostname, metrics.queues = "fitserve-1@host-a", ["cpu", "train"]
    process = worker_process("fitserve-1@host-a", os.getpid())
    assert metrics.process == process
    metrics._start_heartbeat()
    try:
        time.sleep(1.0)  # past the TTL: renewed meanwhile
        assert r.get(alive_key(process)) == "cpu,train"
        assert 0 < r.pttl(alive_key(process)) <= 600
        assert r.get(heartbeat_key("train", "fitserve-1@host-a")) == str(os.getpid())
    finally:
        metrics._on_shutdown()
    assert not r.exists(alive_key(process))
    assert not r.exists(heartbeat_key("train", "fitserve-1@host-a"))
