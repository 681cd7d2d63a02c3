"""What the client needs from a broker connection, and the light ones built from a URL.

A client only publishes requests and listens on its own reply topic, so it needs far less
than a worker (no shared subscriptions, manual acks or backpressure): the
:class:`ClientTransport` protocol is that subset. The worker's transports
(``inference_worker.transports``) satisfy it too, which is how the worker's own client
(``inference_worker.client``) runs the same :class:`~inference_worker_client.InferenceClient`
on them, ``memory://`` included.

URLs: ``mqtt://[user:pass@]host[:port]`` (default port 1883), ``mqtts://…`` (TLS, default
port 8883) and ``kafka://host[:port][,host[:port]...][?fetch_max_wait_ms=M&session_timeout_ms=S]``
(default port 9092; the worker's URL works as it is; needs the ``kafka`` extra, imported
only when used). Credentials in the URL may be percent-encoded;
explicit ``username``/``password`` win over them; they never appear in error messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

from inference_worker_client.tls import TlsOptions

_MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class ClientDelivery(Protocol):
    """One message received on the reply topic."""

    @property
    def payload(self) -> bytes: ...

    def ack(self) -> None: ...


class ClientTransport(Protocol):
    """A broker connection as the client uses it."""

    async def start(self) -> None:
        """Connect and subscribe; returns once the reply subscription is active."""

    async def close(self) -> None:
        """Disconnect; ends `deliveries()`. Idempotent."""

    def deliveries(self) -> AsyncIterator[ClientDelivery]:
        """Messages on the subscribed topics, in arrival order; ends after `close()`."""
        ...

    async def publish(self, topic: str, payload: bytes, *, reply_to: str | None = None) -> None:
        """Publish (at least once); returns once the broker has accepted the message."""


@dataclass(frozen=True)
class Received:
    """A message as a light transport hands it over (already acknowledged on receipt:
    a lost answer is covered by the client's resend, not by redelivery)."""

    payload: bytes
    topic: str

    def ack(self) -> None:
        """Nothing to do: the light transports acknowledge on receipt."""


@dataclass(frozen=True)
class Credentials:
    """Who the client is to the broker: login, TLS files and (Kafka) the SASL mechanism."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions = field(default_factory=TlsOptions)
    sasl_mechanism: str = "SCRAM-SHA-512"


def open_transport(
    url: str, *, client_id: str, reply_to: str, credentials: Credentials
) -> ClientTransport:
    """Build (not start) the light transport `url` names, subscribed to `reply_to`."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in _MQTT_PORTS:
        return _mqtt(url, scheme, client_id, reply_to, credentials)
    if scheme == "kafka":
        from inference_worker_client.kafka import KafkaClientTransport, kafka_address

        return KafkaClientTransport(kafka_address(url), client_id, reply_to, credentials)
    # Never echo the URL: it may carry a password.
    raise ValueError(f"unsupported scheme {scheme!r}; use mqtt://, mqtts:// or kafka://")


def _mqtt(
    url: str, scheme: str, client_id: str, reply_to: str, credentials: Credentials
) -> ClientTransport:
    from inference_worker_client.mqtt import MqttClientTransport

    parts = urlsplit(url)
    try:
        port = parts.port or _MQTT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"{scheme}:// URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{scheme}:// URL needs a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// URL takes no path, query or fragment")
    if scheme == "mqtt" and credentials.tls.given:
        raise ValueError("TLS files are set but the URL is mqtt://: use mqtts://")
    username, password = credentials.username, credentials.password
    if username is None and parts.username is not None:
        username = unquote(parts.username)
        password = password if parts.password is None else unquote(parts.password)
    return MqttClientTransport(
        parts.hostname,
        port,
        client_id=client_id,
        reply_to=reply_to,
        username=username,
        password=password,
        ssl_context=credentials.tls.context() if scheme == "mqtts" else None,
    )
