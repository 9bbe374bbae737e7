"""The composition root: builds every part from Settings and wires them into one server.

The api role never imports TensorFlow: the inference servicers (``service.api.serving``,
and with them TensorFlow) are imported only when this server has the inference role.

A server binds its port alone (no SO_REUSEPORT, which gRPC sets by default): a second
server on a port in use fails at start with AddressInUse instead of silently taking a
share of the connections. Only the processes of ``serve --processes N`` share a port
(``share_port``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fitserve.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from service.api.access import Access
from service.api.app import FitserveServer
from service.api.auth import Authenticator
from service.api.backlog import (
    Backlog,
    channelz_counts,
    channelz_open_streams,
    channelz_server_ids,
)
from service.api.datasets import DatasetServicer
from service.api.gate import CallGate, transport_limit
from service.api.models import ModelServicer
from service.api.status import RpcOutcomes
from service.api.training import TrainingServicer
from service.config import Settings
from service.domain.datasets.store import DatasetStore
from service.domain.job_store import AsyncJobStore
from service.domain.model_store import ModelStore
from service.domain.reaper import Reaper
from service.job_metrics import register_store_collectors
from service.metrics import Metrics, start_redis_probe
from service.plugins import discovery
from service.taskqueue import TaskQueue, create_celery

log = logging.getLogger(__name__)
REDIS_POOL_WAIT = 10.0  # seconds a call waits for a free Redis connection

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
API_SERVICES = (
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
    dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


class AddressInUse(OSError):
    """Another process holds the gRPC address (host:port) this server was to bind."""


async def create_server(
    settings: Settings, metrics: Metrics | None = None, *, share_port: bool = False
) -> tuple[FitserveServer, int]:
    """Build a server for ``settings`` bound to its host and port; returns it and the port.

    AddressInUse when another process holds the port; ``share_port`` (only for the
    processes of ``serve --processes N``) binds it with SO_REUSEPORT, alongside the others.
    """
    metrics = metrics or Metrics()
    outcomes = RpcOutcomes(metrics)
    gate = CallGate(
        settings.max_message_bytes,
        outcomes,
        max_streams=settings.max_streams,
        max_job_watchers=settings.max_job_watchers,
    )
    auth = Authenticator(settings, outcomes)
    await auth.start()  # refuses to start beyond loopback with no way to tell callers apart
    before = channelz_server_ids()
    # The token is checked first, so a caller without one costs no parsing and no queue.
    server = grpc.aio.server(options=_options(settings, share_port), interceptors=[auth, gate])
    app = FitserveServer(server, settings, metrics, health.aio.HealthServicer(), gate=gate)
    app.closers.append(auth.close)
    app.closers.append(start_redis_probe(metrics, settings.redis_url, settings.redis_probe_seconds))
    try:
        # Every server knows its queue (a stop takes the calls waiting in it first); the
        # inference role also keeps it measured, to shed and to batch by it.
        app.backlog = gate.backlog = _backlog(before)
        if "inference" in settings.roles:
            _enable_shedding(app, gate)
        names, waiting = _add_services(server, app, outcomes)
        health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
        reflection.enable_server_reflection(names, server)
        for name in [*names, ""]:
            await app.health.set(name, _NOT_SERVING if name in waiting else _SERVING)
        return app, _bind(server, settings, share_port)
    except BaseException:  # the port is taken, a file is bad: close what was opened
        await app.close_parts()
        raise


def _options(settings: Settings, share_port: bool = False) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", transport_limit(settings.max_message_bytes)),
        # gRPC turns SO_REUSEPORT on unless told not to: then a second server on a port in
        # use binds it too and clients reach whichever the kernel picks.
        ("grpc.so_reuseport", 1 if share_port else 0),
    ]


def _bind(server: grpc.aio.Server, settings: Settings, share_port: bool) -> int:
    """Bind ``host:port`` (0: a free port): TLS (mTLS with a client CA) when settings.tls
    has a certificate, else plaintext. AddressInUse, naming it, when it is taken; TlsFileError
    (a ValueError naming the setting) for bad files."""
    host, port = settings.host, settings.port
    address = f"{host}:{port}"
    try:
        if not settings.tls.enabled:
            bound = server.add_insecure_port(address)
        else:
            cert, key, client_ca = settings.tls.read()
            credentials = grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's "Failed to bind to address", whatever the cause
        bound = 0
    if bound:
        return bound
    if port and not share_port and address_in_use(host, port):
        raise AddressInUse(errno.EADDRINUSE, in_use_message(host, port))
    raise OSError(f"could not bind {host}:{port} (set GRPC_VERBOSITY=debug to see why)")


def address_in_use(host: str, port: int) -> bool:
    """Whether another socket holds ``host:port``: a bind without SO_REUSEPORT fails with
    EADDRINUSE (SO_REUSEADDR set, as gRPC sets it, so connections in TIME_WAIT do not
    count)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return False
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def in_use_message(host: str, port: int) -> str:
    return (
        f"address in use: {host}:{port} is taken by another process (another fitserve "
        "server?); stop it, or give this one another --port (FITSERVE_PORT). Only the "
        "processes of one `fitserve serve --processes N` share a port"
    )


def _enable_shedding(app: FitserveServer, gate: CallGate) -> None:
    """Keep the backlog measured, and give the gate the wait past which it sheds."""
    app.watch_backlog = True
    max_wait = app.settings.inference.max_queue_wait_ms
    gate.max_wait = None if max_wait is None else max_wait / 1000


def _backlog(before: set[int]) -> Backlog | None:
    """The backlog of the server created since ``before`` was read, via channelz."""
    new = channelz_server_ids() - before
    if len(new) != 1:
        log.warning(
            "load shedding is off, and a stop may cancel calls queued in gRPC: its "
            "channelz does not show this server"
        )
        return None
    server_id = new.pop()
    return Backlog(lambda: channelz_counts(server_id), lambda: channelz_open_streams(server_id))


def _add_services(
    server: grpc.aio.Server, app: FitserveServer, outcomes: RpcOutcomes
) -> tuple[list[str], list[str]]:
    """The services of this server's roles: all their names, and those that wait for
    preloading before they report SERVING."""
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    if "api" in app.settings.roles:
        names += _add_api(server, app, outcomes)
    if "inference" not in app.settings.roles:
        return names, []
    from service.api.serving.wiring import add_inference

    inference_names = add_inference(server, app, outcomes)
    waiting = [*inference_names, ""] if app.settings.inference.preload_models else []
    return names + inference_names, waiting


def _add_api(server: grpc.aio.Server, app: FitserveServer, outcomes: RpcOutcomes) -> list[str]:
    """The control plane: training jobs, datasets and models, over Redis and the stores."""
    s = app.settings
    client = _redis(s)
    app.closers.append(client.aclose)
    datasets = DatasetStore(s.datasets_dir, s.max_dataset_bytes, s.max_dataset_expanded_bytes)
    models = ModelStore(s.models_dir)
    queue = TaskQueue(create_celery(s, "fitserve-api"), broker=client)
    jobs = AsyncJobStore(client, retention_seconds=s.job_retention_seconds)
    app.closers.append(jobs.notifier.close)
    reaper = Reaper(
        jobs,
        queue.resubmit,
        lease_seconds=s.job_lease_seconds,
        period_seconds=s.job_reaper_period_seconds,
        max_attempts=s.job_max_attempts,
        jobs_dir=s.jobs_dir,
        models_dir=s.models_dir,
        heartbeat_ttl_seconds=s.heartbeat_ttl_seconds,
    )
    app.closers.append(reaper.start())  # requeues the jobs of lost workers (leases)
    plugins = discovery.load(s.plugins)  # the registry the request checks use
    access = Access(client, jobs, models, datasets, s.auth)
    training = TrainingServicer(
        outcomes,
        jobs,
        queue,
        datasets,
        models,
        app.metrics,
        s.dataset_roots,
        s.dataset_url_schemes,
        plugins,
        s.jobs_dir,
        access,
        max_job_request_bytes=s.max_job_request_bytes,
        time_limits=s.job_time_limit,
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(
        DatasetServicer(outcomes, datasets, app.metrics, access), server
    )
    model_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(outcomes, models, events=client, access=access), server
    )
    close_collectors = register_store_collectors(app.metrics.registry, s)
    app.closers.append(lambda: asyncio.to_thread(close_collectors))
    return list(API_SERVICES)


def _redis(s: Settings) -> aioredis.Redis:
    """The api role's Redis client: calls wait up to REDIS_POOL_WAIT s for a connection
    when all are busy, rather than fail."""
    pool = aioredis.BlockingConnectionPool.from_url(
        s.redis_url,
        decode_responses=True,
        max_connections=s.redis_max_connections,
        timeout=REDIS_POOL_WAIT,
    )
    return aioredis.Redis.from_pool(pool)
