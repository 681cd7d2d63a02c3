"""Assemble a worker from settings and run it with the documented shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference_worker.auth import Authenticator, AuthMode, KeyStore, MemoryKeyStore, RedisKeyStore
from inference_worker.fleet import Heartbeat
from inference_worker.http import HttpEndpoint, Readiness
from inference_worker.metadata import MetadataPublisher, describe, encode, route_for
from inference_worker.metrics import Metrics
from inference_worker.models import ModelRepository
from inference_worker.pipeline import Assembly, Worker
from inference_worker.quota import MemoryQuota, Quota, RedisQuota, parse_weights
from inference_worker.security import broker_security, redact_url, state_security
from inference_worker.serving import load_models
from inference_worker.settings import MetricsSettings, Settings
from inference_worker.state import open_state
from inference_worker.state.base import StateStore
from inference_worker.state.deadletters import poll_length
from inference_worker.state.redis import RedisStateStore
from inference_worker.transports import connect
from inference_worker.transports.base import Transport, TransportOptions
from inference_worker.transports.memory import MemoryBroker

log = logging.getLogger("inference_worker.app")


def worker_name(settings: Settings) -> str:
    return settings.worker.name or f"{socket.gethostname()}-{os.getpid()}"


def worker_transport(
    settings: Settings, name: str, memory: MemoryBroker | None, models: Sequence[str]
) -> Transport:
    broker = settings.broker
    topic = broker.request_topic
    if broker.route_by_model:
        # A fleet whose workers host different models: only this worker's models reach
        # it (request_message/<model>[/<app>]; Kafka request_message.<model>).
        subscriptions = tuple(f"{topic}/{model}/#" for model in models)
    else:
        # `<topic>/#` matches the plain topic too (MQTT: `a/#` matches `a`), so this one
        # filter covers request_message and request_message/<model>[/<app>]; subscribing
        # to both would deliver every plain request twice.
        subscriptions = (f"{topic}/#",)
    options = TransportOptions(
        client_id=broker.client_id or name,
        subscriptions=subscriptions,
        topics=(broker.response_topic, broker.dlq_topic, broker.metadata_kafka_topic),
        compacted=(broker.metadata_kafka_topic,),
        shared_group=broker.group,
        qos=broker.qos,
        receive_maximum=broker.receive_maximum,
        max_inflight=broker.max_inflight,
        reconnect_min_s=broker.reconnect_min_s,
        reconnect_max_s=broker.reconnect_max_s,
        keepalive_s=broker.keepalive_s,
        session_expiry_s=broker.session_expiry_s,
        buffer=settings.worker.intake_buffer,
        security=broker_security(broker),
    )
    return connect(broker.url, options, memory=memory)


async def start_http(
    settings: MetricsSettings, metrics: Metrics, readiness: Readiness
) -> HttpEndpoint | None:
    """Start `/metrics`, `/healthz`, `/readyz`; None when disabled or the port is taken.

    A taken port is logged, not fatal: several workers started by hand on one host
    (without `run --replicas`, which gives each slot its own port) still serve.
    """
    if not settings.enabled:
        return None
    endpoint = HttpEndpoint(
        settings.host, settings.port, metrics=metrics.exposition, readiness=readiness
    )
    try:
        await endpoint.start()
    except OSError as exc:
        log.error(
            "HTTP endpoint not started (metrics and probes unavailable)",
            extra={"host": settings.host, "port": settings.port, "error": str(exc)},
        )
        return None
    log.info("http endpoint listening", extra={"host": settings.host, "port": endpoint.port})
    return endpoint


@dataclass(frozen=True)
class AccessControl:
    auth: Authenticator | None = None
    quota: Quota | None = None
    weights: Mapping[str, int] = field(default_factory=dict)


def access_control(settings: Settings, state: StateStore) -> AccessControl:
    """API-key checks, per-app quotas and batch weights, from settings.

    Keys and buckets live in Redis so the whole fleet agrees; with `memory://` state
    they are per process (keys then exist only for tests that create them).
    """
    client = state.client if isinstance(state, RedisStateStore) else None
    prefix = settings.state.prefix
    mode = AuthMode(
        {"false": "off"}.get(str(settings.auth.mode).lower(), str(settings.auth.mode).lower())
    )
    auth = quota = None
    if mode is not AuthMode.OFF:
        store: KeyStore = RedisKeyStore(client, prefix) if client is not None else MemoryKeyStore()
        auth = Authenticator(store, mode, cache_ttl_s=settings.auth.cache_ttl_s)
    if settings.quota.enabled:
        q = settings.quota
        quota = (
            RedisQuota(client, prefix, rate=q.rate, burst=q.burst)
            if client is not None
            else MemoryQuota(rate=q.rate, burst=q.burst)
        )
    return AccessControl(auth, quota, parse_weights(settings.quota.weights))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    memory: MemoryBroker | None = None,
    state: StateStore | None = None,
    on_ready: Callable[[Worker], None] | None = None,
    on_http: Callable[[HttpEndpoint], None] | None = None,
    info: Mapping[str, str] | None = None,
    reload: asyncio.Event | None = None,
) -> Worker:
    """Start everything, serve until `stop`, then close in order; returns the worker.

    Startup: HTTP endpoint (so `/healthz` answers while models load) → state store →
    models loaded and warmed up → broker connected → heartbeat → `/readyz` 200.
    Shutdown: `/readyz` 503 as soon as `stop` is set → drain (`Worker.serve`) →
    heartbeat record removed → transport → state store → HTTP endpoint.
    `info` adds fields to the fleet record (e.g. `cuda_visible_devices`).
    """
    name = worker_name(settings)
    metrics = Metrics()
    readiness = Readiness(stop.is_set)
    http = await start_http(settings.metrics, metrics, readiness)
    if http is not None and on_http is not None:
        on_http(http)
    try:
        state = state or open_state(
            settings.state.url, prefix=settings.state.prefix, **state_security(settings.state)
        )
        await state.start()
        readiness.state = state
        try:
            return await _serve(settings, stop, name, metrics, readiness, http, state, memory,
                                on_ready, info or {}, reload)  # fmt: skip
        finally:
            await state.close()
    finally:
        if http is not None:
            await http.close()


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    name: str,
    metrics: Metrics,
    readiness: Readiness,
    http: HttpEndpoint | None,
    state: StateStore,
    memory: MemoryBroker | None,
    on_ready: Callable[[Worker], None] | None,
    info: Mapping[str, str],
    reload: asyncio.Event | None,
) -> Worker:
    models = await asyncio.to_thread(load_models, settings.models)  # loaded and warmed up
    names = sorted({m.config.name for m in models})
    readiness.models = names
    transport = worker_transport(settings, name, memory, names)
    access = access_control(settings, state)
    worker = Worker(
        Assembly(
            settings, transport, state, models, name, metrics,
            auth=access.auth, quota=access.quota, weights=access.weights,
        )
    )  # fmt: skip
    await transport.start()
    readiness.transport = transport
    publisher = MetadataPublisher(transport, route_for(settings.broker))
    await publisher.sync(served_metadata(worker))
    readiness.pipeline = lambda: worker.healthy
    heartbeat: Heartbeat | None = None
    beating: asyncio.Task[None] | None = None
    if isinstance(state, RedisStateStore):
        heartbeat = Heartbeat(
            state.client,
            prefix=settings.state.prefix,
            name=name,
            interval_s=settings.worker.heartbeat_s,
            metrics=metrics,
            info={
                "devices": ",".join(sorted({m.runner.device for m in models})),
                "models": ",".join(f"{m.config.name}:{m.version}" for m in models),
                "metrics_port": str(http.port) if http is not None else "",
                **info,
            },
            queue_depth=lambda: worker.queue_depth,
            draining=stop.is_set,
        )
        beating = asyncio.create_task(heartbeat.run(stop), name="iw-heartbeat")
    log.info(
        "worker ready",
        extra={"worker": name, "models": names, "broker": redact_url(settings.broker.url)},
    )
    if on_ready is not None:
        on_ready(worker)
    watching = asyncio.create_task(
        _watch_models(worker, settings, stop, reload, publisher), name="iw-models"
    )
    counting = asyncio.create_task(
        poll_length(
            worker.outbox.letters,
            metrics.dead_letter_entries.set,
            interval_s=settings.dlq.length_poll_s,
        ),
        name="iw-dlq-length",
    )
    try:
        # serve() stops intake, flushes batchers and finishes in-flight work
        # (complete in Redis, publish) before it returns.
        await worker.serve(stop)
    finally:
        # Then the connections: the fleet record goes first (a clean exit is not a stale
        # worker), the transport last-but-one so the final publishes and acks reach the
        # broker, the state store last (closed by the caller).
        for task in (watching, counting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if beating is not None and heartbeat is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await heartbeat.remove()
        await transport.close()
        log.info("worker stopped", extra={"worker": name, "stats": worker.stats.snapshot()})
    return worker


def served_metadata(worker: Worker) -> dict[str, bytes]:
    """The metadata documents of what `worker` serves now (inference_worker.metadata)."""
    host = worker.lanes.host
    return {
        name: encode(describe(worker.lanes.resolve(name, None).served.config, host.versions(name)))
        for name in host.names
    }


async def _watch_models(
    worker: Worker,
    settings: Settings,
    stop: asyncio.Event,
    reload: asyncio.Event | None,
    publisher: MetadataPublisher,
) -> None:
    """Hot reload: look at the model repository every `poll_interval_s` and on SIGHUP;
    then bring the retained model metadata in line (publishes only what changed)."""
    repo = ModelRepository(Path(settings.models.root))
    interval = settings.models.poll_interval_s
    poke = reload or asyncio.Event()
    while not stop.is_set():
        timeout = interval if interval > 0 else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(poke.wait(), timeout)
        poke.clear()
        if stop.is_set():
            return
        await worker.reload_models(repo)
        await publisher.sync(served_metadata(worker))
