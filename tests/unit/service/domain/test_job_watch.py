"""StreamNotifier against a real Redis: wake-ups, cursors, and one connection for all."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from service.domain.job_watch import StreamNotifier

WAIT = 10.0  # seconds; longer than any wake-up should take


def _key() -> str:
    return f"test:watch:{uuid.uuid4().hex}"


async def _with_notifier(redis_url: str, body) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    notifier = StreamNotifier(client)
    try:
        await body(client, notifier)
    finally:
        await notifier.close()
        await client.aclose()


def test_a_waiter_wakes_when_an_entry_comes_after_what_it_has_seen(redis_url: str) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        key = _key()
        seen = await client.xadd(key, {"n": "1"})
        waiting = asyncio.create_task(notifier.wait(key, seen, WAIT))
        await asyncio.sleep(0.3)  # the waiter is registered and the read is blocked
        assert not waiting.done()  # the entry it has seen does not wake it
        started = time.monotonic()
        await client.xadd(key, {"n": "2"})
        await asyncio.wait_for(waiting, WAIT)
        assert time.monotonic() - started < 2.0

    asyncio.run(_with_notifier(redis_url, body))


def test_an_entry_added_before_the_wait_began_wakes_it_at_once(redis_url: str) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        key = _key()
        await client.xadd(key, {"n": "1"})  # "" means nothing seen yet: this one is new
        await asyncio.wait_for(notifier.wait(key, "", WAIT), WAIT / 2)

    asyncio.run(_with_notifier(redis_url, body))


def test_with_nothing_new_the_wait_ends_after_its_longest(redis_url: str) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        key = _key()
        seen = await client.xadd(key, {"n": "1"})
        started = time.monotonic()
        await notifier.wait(key, seen, 0.3)
        assert time.monotonic() - started >= 0.3
        assert notifier.watched == 0  # the waiter is gone

    asyncio.run(_with_notifier(redis_url, body))


def test_hundreds_of_waiters_share_one_connection_and_each_wakes_on_its_stream(
    redis_url: str,
) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        async with aioredis.Redis.from_url(redis_url) as probe:
            before = len(await probe.client_list())
            keys = [_key() for _ in range(300)]
            waits = [asyncio.create_task(notifier.wait(k, "", WAIT)) for k in keys]
            await asyncio.sleep(0.3)
            assert notifier.watched == 300
            assert len(await probe.client_list()) - before <= 2  # not one per waiter
            for key in keys[:150]:
                await client.xadd(key, {"n": "1"})
            woken = await asyncio.wait_for(asyncio.gather(*waits[:150]), WAIT)
            assert len(woken) == 150
            assert not any(w.done() for w in waits[150:])  # the quiet streams still wait
            for w in waits[150:]:
                w.cancel()
            await asyncio.gather(*waits[150:], return_exceptions=True)

    asyncio.run(_with_notifier(redis_url, body))


def test_a_waiter_with_a_cursor_that_is_not_an_id_breaks_no_one(redis_url: str) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        odd, key = _key(), _key()
        odd_wait = asyncio.create_task(notifier.wait(odd, "$", WAIT))
        seen = await client.xadd(key, {"n": "1"})
        waiting = asyncio.create_task(notifier.wait(key, seen, WAIT))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await client.xadd(key, {"n": "2"})
        await asyncio.wait_for(waiting, WAIT)
        assert time.monotonic() - started < 2.0  # the shared read still runs
        await client.xadd(odd, {"n": "1"})  # "$" counts as "from the start"
        await asyncio.wait_for(odd_wait, WAIT)

    asyncio.run(_with_notifier(redis_url, body))


def test_closing_wakes_the_waiters_and_later_waits_return_at_once(redis_url: str) -> None:
    async def body(client: aioredis.Redis, notifier: StreamNotifier) -> None:
        key = _key()
        seen = await client.xadd(key, {"n": "1"})
        waiting = asyncio.create_task(notifier.wait(key, seen, 3600))
        await asyncio.sleep(0.2)
        await notifier.close()
        await asyncio.wait_for(waiting, WAIT)  # not the hour
        await asyncio.wait_for(notifier.wait(key, seen, 3600), WAIT)

    asyncio.run(_with_notifier(redis_url, body))
