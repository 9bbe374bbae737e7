"""The backlog estimator: how many calls wait in gRPC's core before a handler, and how long.

Under overload a grpc.aio server does not queue calls where Python can see them: gRPC's C
core holds the calls that have arrived until the server's accept loop takes them, one per
event-loop turn. The batcher's queue stays short and the event loop does not lag, and yet
each call waits long before any handler runs. ``Backlog`` measures
that hidden queue: gRPC's channelz counts the calls the core has started and finished;
calls that reached a handler and have not returned are counted by ``CallGate``
(``service.api.gate``); the difference is the calls still waiting in the core.

**The wait is measured, not estimated from a rate.** Every reading (every 10 ms) records
when the core's count of calls started reached its value. The core hands calls to the
server in the order they came (per method), so the calls taken so far are the first
``started - waiting`` ones, and the oldest call still waiting is the next: it started after
the last reading that had not counted it yet, so it has waited at least since the first
reading that did (``wait_at``: a lower bound, to the 10 ms of one reading). Shedding
(``CallGate``) looks at that age only: a few calls queued on a server that has just
started, or on a busy machine whose calls still get through in time, are never shed,
however slowly calls happened to drain a moment ago; a queue whose oldest call has
waited past ``FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS`` is shed at once, freshly started
server or not. ``shed_share`` turns that wait into the share of Predict calls to refuse.

**Calls that end in the core.** channelz's server counts end a call only when the server
application has taken it (its final ``RECV_CLOSE_ON_SERVER`` op). A call that ends while it
still waits in the core's queue (the client cancels it, its deadline passes) is freed there
without ever being counted as ended, so ``started - succeeded - failed`` keeps it open for
ever. A burst of cancelled calls (thousands of ``WatchJob`` streams their clients dropped)
left hundreds of such calls counted as waiting, a wait of minutes, and Predict shed until
restart. The transport's own counts (channelz's per-connection stream counts) do close
them; so while calls are counted waiting, the backlog re-bases against those at most every
``REBASE_SECONDS`` (in a thread; the reads cost ~0.25 ms a connection, so they take at most
``REBASE_DUTY`` of the time): the calls the server counts open but no connection has open are
``lost``, never waiting again.
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from service import errors
from service.metrics import Metrics

log = logging.getLogger(__name__)

MAX_SHED_SHARE = 0.95
REBASE_SECONDS = 1.0  # least time between two re-bases against the connections' counts
REBASE_DUTY = 0.05  # most of the time spent reading the connections' counts


class Overloaded(errors.ResourceExhausted):
    """Calls wait too long in gRPC's queue; ``retry_after_seconds`` is that wait."""


def _cygrpc() -> Any:
    """grpcio's core binding, a private module, for its ``channelz_get_servers`` and
    ``channelz_get_server`` (JSON) calls.

    No public API serves: gRPC Python exposes channelz only as a gRPC service (the
    grpcio-channelz package, whose servicer reads these same private calls, and which is
    not published for every grpcio release), not as an in-process call. Imported by name so
    that a grpcio without it turns shedding off (``channelz_server_ids``) instead of
    failing the import of this module.
    """
    return importlib.import_module("grpc._cython.cygrpc")


def channelz_counts(server_id: int) -> tuple[int, int, int]:
    """Calls started, succeeded and failed of one gRPC server, from channelz."""
    data = json.loads(_cygrpc().channelz_get_server(server_id))["server"]["data"]
    return (
        int(data.get("callsStarted", 0)),
        int(data.get("callsSucceeded", 0)),
        int(data.get("callsFailed", 0)),
    )


def channelz_open_streams(server_id: int) -> int:
    """Streams open now on the connections of one gRPC server, from channelz's socket counts.

    The transport closes a stream however its call ends, waiting in the core included, so
    this counts no call the server's own counts have lost. A connection that closes while
    it is read holds no open stream.
    """
    cygrpc, total, start = _cygrpc(), 0, 0
    while True:
        page = json.loads(cygrpc.channelz_get_server_sockets(server_id, start, 0))
        refs = page.get("socketRef", [])
        for ref in refs:
            try:
                data = json.loads(cygrpc.channelz_get_socket(int(ref["socketId"])))
            except ValueError:  # closed since it was listed
                continue
            counts = data["socket"].get("data", {})
            total += (
                int(counts.get("streamsStarted", 0))
                - int(counts.get("streamsSucceeded", 0))
                - int(counts.get("streamsFailed", 0))
            )
        if page.get("end", False) or not refs:
            return total
        start = max(int(r["socketId"]) for r in refs) + 1


def channelz_server_ids() -> set[int]:
    """The ids of the gRPC servers of this process (empty when channelz is unavailable)."""
    try:
        found = json.loads(_cygrpc().channelz_get_servers(0)).get("server", [])
    except Exception:  # an unexpected grpcio build: shedding turns itself off
        return set()
    return {int(s["ref"]["serverId"]) for s in found}


class Backlog:
    """How many calls wait in gRPC's core before a handler, and how long the oldest of them
    has waited.

    ``update`` reads the core's counts (every few ms); ``wait_at`` answers between
    readings, counting the calls that have reached a handler since the last one as taken
    from the front of the queue.
    """

    def __init__(
        self,
        read_counts: Callable[[], tuple[int, int, int]],
        read_open_streams: Callable[[], int] | None = None,
    ) -> None:
        self._read = read_counts
        self._read_open = read_open_streams  # None: never re-based
        self.active = 0  # calls inside a handler
        self.arrived = 0  # calls that have reached a handler, ever
        self.waiting = 0  # calls in the core, not yet at a handler
        self.lost = 0  # calls the core's counts hold open for ever (ended before a handler)
        self._rebase_at = 0.0  # when the next re-base may run
        self.wait_seconds = 0.0  # how long the oldest waiting call had waited, last reading
        # Readings at which the count of calls started grew: when, and to what. Kept from
        # the one that first counted the oldest call still waiting.
        self._times: list[float] = []
        self._starts: list[int] = []
        self._started = 0  # calls started, at the last reading
        self._taken = 0  # calls no longer waiting (at a handler, ended, lost), then
        self._arrived_then = 0  # ``arrived`` at the last reading

    def count_waiting(self) -> int:
        """Calls in the core not at a handler yet, read now (from any thread; 0 when the
        counts cannot be read, e.g. once the server has stopped)."""
        try:
            return self._waiting_now()
        except Exception:
            return 0

    def update(self, now: float | None = None) -> None:
        """Read the core's counts and measure the wait (called every few ms)."""
        now = time.monotonic() if now is None else now
        started, succeeded, failed = self._read()
        self.waiting = max(0, started - succeeded - failed - self.active - self.lost)
        if not self._starts or started > self._starts[-1]:
            self._times.append(now)
            self._starts.append(started)
        self._started, self._taken = started, started - self.waiting
        self._arrived_then = self.arrived
        self._forget(self._taken + 1)
        self.wait_seconds = self.wait_at(now)

    def wait_at(self, now: float) -> float:
        """How long the oldest call still waiting has waited at ``now``, at least (0 when
        none waits): the calls that reached a handler since the last reading left the
        front of the queue."""
        if not self.waiting:
            return 0.0
        oldest = self._taken + max(0, self.arrived - self._arrived_then) + 1
        if oldest > self._started:  # every call waiting at the last reading has left
            return 0.0
        # The first reading that counted it: it has waited since then, at least.
        since = self._times[bisect.bisect_left(self._starts, oldest)]
        return max(0.0, now - since)

    def _forget(self, oldest: int) -> None:
        """Drop the readings older than the one that first counted call ``oldest``."""
        drop = bisect.bisect_left(self._starts, oldest)
        drop = min(drop, len(self._starts) - 1)  # always keep the last reading
        if drop > 0:
            del self._times[:drop], self._starts[:drop]

    def _waiting_now(self) -> int:
        return max(0, self._open_calls() - self.active - self.lost)

    def _open_calls(self) -> int:
        started, succeeded, failed = self._read()
        return started - succeeded - failed

    @property
    def rebasing(self) -> bool:
        """Whether the connections' counts can be read (``measure_lost``)."""
        return self._read_open is not None

    def stop_rebasing(self) -> None:
        """Never re-base again (the connections' counts cannot be read)."""
        self._read_open = None

    def rebase_due(self, now: float) -> bool:
        """Whether to re-base now: calls are counted waiting, and the last re-base was long
        enough ago."""
        return self._read_open is not None and self.waiting > 0 and now >= self._rebase_at

    def measure_lost(self) -> tuple[int, float]:
        """The calls the server's counts hold open that no connection has open (lost), and
        how long reading took; runs in a thread (the reads are slow, and thread-safe).

        The server's counts are read before and after the connections', and the lesser
        taken: a call that starts or ends while the connections are read then errs towards
        counting as waiting until the next re-base, not towards hiding a call that waits.
        """
        assert self._read_open is not None
        began = time.monotonic()
        before = self._open_calls()
        streams = self._read_open()
        after = self._open_calls()
        return max(0, min(before, after) - streams), time.monotonic() - began

    def rebased(self, lost: int, took: float, now: float) -> None:
        """Take a ``measure_lost`` result; the next re-base waits so reading takes at most
        ``REBASE_DUTY`` of the time."""
        if lost > self.lost:
            log.info(
                "%d calls ended in gRPC's core before a handler took them (cancelled or "
                "expired while queued); no longer counted as waiting",
                lost - self.lost,
            )
        self.lost = lost
        self._rebase_at = now + max(REBASE_SECONDS, took / REBASE_DUTY)


def shed_share(wait: float, max_wait: float) -> float:
    """The share of sheddable calls refused at a measured ``wait``: none up to
    ``max_wait``, rising to ``MAX_SHED_SHARE`` at 1.5 x ``max_wait``.

    Never all: callers that retry at once without backing off keep gRPC's queue full
    however fast refusals are, so refusing everything would serve no one. Refusing a share
    settles the wait a little over ``max_wait`` and keeps serving the rest.
    """
    return min(MAX_SHED_SHARE, max(0.0, 2 * (wait - max_wait) / max_wait))


async def watch_backlog(backlog: Backlog, metrics: Metrics, interval: float = 0.01) -> None:
    """Keep ``backlog`` and its gauges current until cancelled, re-basing it (in a thread)
    whenever it is due."""
    rebase: asyncio.Future[tuple[int, float]] | None = None
    try:
        while True:
            await asyncio.sleep(interval)  # a sampling period, not a wait for a condition
            try:
                backlog.update()
            except Exception as exc:  # channelz changed shape: stop shedding, keep serving
                log.warning("load shedding is off: cannot read gRPC's channelz counts (%s)", exc)
                backlog.wait_seconds = 0.0
                return
            now = time.monotonic()
            if rebase is not None and rebase.done():
                _take_rebase(backlog, rebase, now)
                rebase = None
            if rebase is None and backlog.rebase_due(now):
                rebase = asyncio.ensure_future(asyncio.to_thread(backlog.measure_lost))
            metrics.grpc_queued_calls.set(backlog.waiting)
            metrics.grpc_queue_wait.set(backlog.wait_seconds)
    finally:
        if rebase is not None:
            rebase.cancel()


def _take_rebase(backlog: Backlog, rebase: asyncio.Future[tuple[int, float]], now: float) -> None:
    """Apply a finished re-base; one that failed turns re-basing off (the counts it reads
    changed shape), not shedding."""
    try:
        lost, took = rebase.result()
    except Exception as exc:
        log.warning(
            "cannot read gRPC's connection counts (%s); calls that end while "
            "queued stay counted as waiting",
            exc,
        )
        backlog.stop_rebasing()
        return
    backlog.rebased(lost, took, now)
