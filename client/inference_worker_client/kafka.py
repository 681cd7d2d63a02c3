"""The light Kafka transport (aiokafka, the ``kafka`` extra): a producer with
``acks="all"`` and a private consumer on the client's own reply topic.

Topic names: the wire names topics MQTT-style (``response_message/_/<client id>``) and
Kafka cannot hold ``/``, so each ``/`` becomes ``.`` (``response_message._.<client id>``),
the mapping the worker uses; every level must be ``[A-Za-z0-9_-]+``. The reply topic is
told to the worker in the ``reply_to`` record header, by its Kafka name (the worker maps
it back).

The client creates its reply topic (the worker never creates topics it is asked to answer
on) and reads it from the earliest offset with a consumer group of its own, so nothing
answered before the first assignment is missed. Records are "acked" by not committing:
the group is private and dies with the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from inference_worker_client.transport import Credentials, Received

_LEVEL = re.compile(r"[A-Za-z0-9_-]+")


def kafka_name(topic: str) -> str:
    """The Kafka name of an MQTT-style topic (`a/b` → `a.b`); ValueError if it has none."""
    levels = topic.split("/")
    if not all(_LEVEL.fullmatch(level) for level in levels) or topic.startswith("__"):
        raise ValueError(f"topic {topic!r} has no Kafka name (levels must be [A-Za-z0-9_-]+)")
    return ".".join(levels)


@dataclass(frozen=True)
class KafkaAddress:
    """A `kafka://` URL: bootstrap servers and the consumer settings its query may hold.

    The query takes the worker's parameters, so one URL serves both: `fetch_max_wait_ms`
    (default 20), `session_timeout_ms` (default 10000) and `partitions` (of a reply topic
    the client creates; default 1, all one client needs).
    """

    bootstrap: str
    fetch_max_wait_ms: int = 20
    session_timeout_ms: int = 10_000
    partitions: int = 1


def kafka_address(url: str) -> KafkaAddress:
    """`kafka://h1:9092,h2?fetch_max_wait_ms=5` → bootstrap `h1:9092,h2:9092` and settings."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("kafka:// URL credentials are not supported: pass username/password")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError("kafka:// URL takes no path or fragment")
    hosts = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if not host or (sep and not port.isdigit()):
            raise ValueError("kafka:// URL needs host[:port][,host[:port]...]")
        hosts.append(f"{host}:{port or 9092}")
    query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    known = {"fetch_max_wait_ms": 20, "session_timeout_ms": 10_000, "partitions": 1}
    if set(query) - set(known):
        raise ValueError(
            f"kafka:// URL: unknown query parameters {sorted(set(query) - set(known))}"
        )
    values = {}
    for name, default in known.items():
        text = query.get(name, [str(default)])[-1]
        if not text.isdigit():
            raise ValueError(f"kafka:// URL: {name} must be a non-negative integer")
        values[name] = int(text)
    return KafkaAddress(
        ",".join(hosts),
        fetch_max_wait_ms=values["fetch_max_wait_ms"],
        session_timeout_ms=max(1000, values["session_timeout_ms"]),
        partitions=max(1, values["partitions"]),
    )


def security_kwargs(credentials: Credentials) -> dict[str, Any]:
    """aiokafka's security arguments: TLS files alone mean SSL, a username SASL_SSL."""
    tls = credentials.tls
    if credentials.username is None:
        if not tls.given:
            return {"security_protocol": "PLAINTEXT"}
        protocol = "SSL"
    else:
        protocol = "SASL_SSL"
    tls.check()
    ctx = create_ssl_context(
        cafile=tls.ca_file or None, certfile=tls.cert_file or None, keyfile=tls.key_file or None
    )
    out: dict[str, Any] = {"security_protocol": protocol, "ssl_context": ctx}
    if protocol == "SASL_SSL":
        out["sasl_mechanism"] = credentials.sasl_mechanism
        out["sasl_plain_username"] = credentials.username
        out["sasl_plain_password"] = credentials.password or ""
    return out


class KafkaClientTransport:
    """Producer + private consumer on one reply topic (see the module docstring)."""

    def __init__(
        self,
        address: KafkaAddress,
        client_id: str,
        reply_to: str,
        credentials: Credentials,
        *,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self.bootstrap = address.bootstrap
        self.client_id = client_id
        self.reply_to = reply_to
        self._reply_topic = kafka_name(reply_to)
        self._security = security_kwargs(credentials)
        self._connect_timeout_s = connect_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._closed = False

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._start(), self._connect_timeout_s)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError | KafkaError | OSError):
                raise ConnectionError(
                    f"Kafka at {self.bootstrap} not ready within {self._connect_timeout_s}s"
                ) from None
            raise

    async def _start(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self._security)
        await admin.start()
        try:
            if self._reply_topic not in await admin.list_topics():
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(self._reply_topic, self.address.partitions, 1)]
                    )
        finally:
            await admin.close()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, **self._security
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            self._reply_topic,
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=f"iw-client-{self.client_id}-{uuid.uuid4().hex[:8]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.address.fetch_max_wait_ms,
            session_timeout_ms=self.address.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.address.session_timeout_ms // 3),
            **self._security,
        )
        await self._consumer.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in (self._consumer, self._producer):
            if part is not None:
                await part.stop()

    async def deliveries(self) -> AsyncIterator[Received]:
        consumer = self._consumer
        if consumer is None:
            return
        while not self._closed:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError:
                await asyncio.sleep(0.5)  # a broker hiccup: aiokafka reconnects by itself
                continue
            for records in batches.values():
                for record in records:
                    yield Received(record.value or b"", self.reply_to)

    async def publish(self, topic: str, payload: bytes, *, reply_to: str | None = None) -> None:
        if self._producer is None or self._closed:
            raise ConnectionError("transport not started or closed")
        headers = [] if reply_to is None else [("reply_to", kafka_name(reply_to).encode())]
        await self._producer.send_and_wait(kafka_name(topic), payload, headers=headers)
