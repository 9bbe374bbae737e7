"""One Redis read for all the job event streams this process is watching.

A ``WatchJob`` call that waited on its own stream (``XREAD BLOCK``) would hold a Redis
connection for as long as it waits, so an api process could serve only as many watchers as
its connection pool has connections, and past that every other call failed too
(docs/scaling.md). Here a watcher with nothing new to read registers the stream and
the last event id it has seen; one task per process reads every registered stream in a
single ``XREAD BLOCK`` and wakes the watchers of the streams that have new entries, which then
read their events themselves with a short, non-blocking call. Watchers cost no connection
while they wait, and Redis sees one blocking read per process instead of one per watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

BLOCK_MS = 100  # one read's wait; a stream registered meanwhile joins the next read
RETRY_SECONDS = 0.5  # pause after a failed read, so a Redis outage is not a busy loop


def _order(event_id: str) -> tuple[int, int]:
    """Stream ids in Redis's order; anything else sorts first (read from the start)."""
    ms, _, seq = event_id.partition("-")
    if not (ms.isdigit() and (seq.isdigit() or not seq)):
        return (0, 0)
    return int(ms), int(seq or 0)


class StreamNotifier:
    """Wakes the watchers of Redis streams when entries arrive after what they have seen."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        self._waiting: dict[str, list[tuple[str, asyncio.Event]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def watched(self) -> int:
        """Streams with a watcher waiting."""
        return len(self._waiting)

    async def wait(self, key: str, after: str, longest: float) -> None:
        """Return once stream ``key`` has an entry after id ``after`` ("": any entry), or
        after ``longest`` seconds, whichever is first. The caller reads the entries."""
        if self._closed:
            return
        if _order(after) == (0, 0):
            after = "0-0"
        entry = (after, asyncio.Event())
        self._waiting.setdefault(key, []).append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[1].wait(), longest)
        finally:
            entries = self._waiting.get(key, [])
            if entry in entries:
                entries.remove(entry)
                if not entries:
                    del self._waiting[key]

    async def close(self) -> None:
        """Stop reading for good; waiting watchers are woken to end their waits."""
        self._closed = True
        self._wake(list(self._waiting))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._waiting and not self._closed:
            try:
                streams: Any = {
                    key: min((after for after, _ in entries), key=_order)
                    for key, entries in self._waiting.items()
                }
                reply: Any = await self._r.xread(streams, count=1, block=BLOCK_MS)
            except Exception as exc:  # Redis trouble: let every watcher read (and report) it
                log.warning("reading the watched job streams failed: %s", exc)
                self._wake(list(self._waiting))
                await asyncio.sleep(RETRY_SECONDS)  # a pause before retrying, not a poll
                continue
            self._wake([_text(key) for key, _entries in reply or []])

    def _wake(self, keys: list[str]) -> None:
        for key in keys:
            for _after, event in self._waiting.pop(key, []):
                event.set()


def _text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key
