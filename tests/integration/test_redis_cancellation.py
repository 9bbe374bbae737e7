"""The asyncio Redis client passes a task's cancellation on, as asyncio requires.

Streams (WatchJob, health Watch), the reaper and the server's stop all end by cancelling
tasks that wait on Redis. redis-py 8.0 to 8.2 swallow the CancelledError of a task
cancelled during a command most of the time: the task runs on, so a WatchJob whose
client has gone loops forever and is never counted, and a stopping server waits on it.
pyproject.toml keeps redis below 8; this test fails on a client that swallows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

ROUNDS = 300  # at 8.2's rate (about 7 in 10 swallowed) this cannot pass by luck


async def _swallowed(command: Callable[[], Awaitable[Any]]) -> int:
    """How many of ROUNDS tasks, each repeating ``command`` and cancelled at a random
    moment, ran on past their cancellation."""
    ran_on = 0

    async def repeat() -> None:
        nonlocal ran_on
        while True:
            await command()
            task = asyncio.current_task()
            assert task is not None
            if task.cancelling():  # cancelled, yet the command returned normally
                ran_on += 1
                return

    rng = random.Random(0)
    for _ in range(ROUNDS):
        task = asyncio.create_task(repeat())
        await asyncio.sleep(rng.random() * 0.002)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return ran_on


@pytest.mark.parametrize("command", ["hget", "xrange", "pipeline"])
def test_a_task_cancelled_during_a_command_is_cancelled(redis_url: str, command: str) -> None:
    async def main() -> int:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.xadd("cancel-test:stream", {"k": "v"})

            async def pipeline() -> Any:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hget("cancel-test:hash", "f")
                    pipe.xrange("cancel-test:stream", count=1)
                    return await pipe.execute()

            commands: dict[str, Callable[[], Awaitable[Any]]] = {
                "hget": lambda: client.hget("cancel-test:hash", "f"),
                "xrange": lambda: client.xrange("cancel-test:stream", count=1),
                "pipeline": pipeline,
            }
            return await _swallowed(commands[command])
        finally:
            await client.aclose()

    assert asyncio.run(main()) == 0, (
        f"redis-py {redis.__version__} swallowed task cancellations during {command}; "
        "see pyproject.toml's redis pin"
    )
