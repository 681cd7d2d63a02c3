"""Transports: build one from a URL with `connect()`.

Supported URLs: `memory://` (needs the `memory` hub to share between transports),
`mqtt://[user:pass@]host[:port]` (default port 1883) and `mqtts://…` (TLS ≥ 1.2, default
port 8883, server certificate and hostname checked against `options.security.tls.ca_file`
or the system CAs; a client certificate/key when given) and
`kafka://host[:port][,host[:port]...][?partitions=N&fetch_max_wait_ms=M]` (default port
9092; `fetch_max_wait_ms` default 20, how long the broker may hold an empty fetch; `partitions` is
the partition count of topics the transport creates, default 4; needs the `kafka` extra,
imported only when used; SSL/SASL from `options.security`). Credentials in the URL may be
percent-encoded; `options.security.username/password` win over them; they never appear in
error messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from inference_worker.transports.base import Delivery, Transport, TransportOptions
from inference_worker.transports.memory import MemoryBroker, MemoryTransport
from inference_worker.transports.mqtt import MqttTransport

if TYPE_CHECKING:
    from inference_worker.transports.kafka import KafkaTransport

__all__ = [
    "Delivery",
    "MemoryBroker",
    "MemoryTransport",
    "MqttTransport",
    "Transport",
    "TransportOptions",
    "connect",
]

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def connect(
    url: str, options: TransportOptions, *, memory: MemoryBroker | None = None
) -> Transport:
    """Build (not start) the transport that `url` names; call `await t.start()` next."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        if memory is None:
            raise ValueError("memory:// needs a MemoryBroker passed as memory=")
        return MemoryTransport(memory, options)
    if scheme in _DEFAULT_PORTS:
        return _mqtt(url, scheme, options)
    if scheme == "kafka":
        return _kafka(url, options)
    # Never echo the URL: it may carry a password.
    raise ValueError(
        f"unsupported transport scheme {scheme!r}; use memory://, mqtt://, mqtts:// or kafka://"
    )


def _kafka(url: str, options: TransportOptions) -> KafkaTransport:
    """`kafka://h1:9092,h2:9092?partitions=8` → a KafkaTransport (aiokafka imported here).

    Query parameters: `partitions` (for the topics it creates, default 4),
    `fetch_max_wait_ms` (default 20), `session_timeout_ms` (default 10000).
    """
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "kafka:// URL credentials are not supported: set broker.username and "
            "broker.password_file with security_protocol SASL_SSL"
        )
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError("kafka:// URL takes no path or fragment")
    hosts = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if not host or (sep and not port.isdigit()):
            raise ValueError("kafka:// URL needs host[:port][,host[:port]...]")
        hosts.append(f"{host}:{port or 9092}")
    query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    unknown = set(query) - {"partitions", "fetch_max_wait_ms", "session_timeout_ms"}
    if unknown:
        raise ValueError(f"kafka:// URL: unknown query parameters {sorted(unknown)}")
    partitions = query.get("partitions", ["4"])[-1]
    if not partitions.isdigit() or int(partitions) < 1:
        raise ValueError("kafka:// URL: partitions must be a positive integer")
    from inference_worker.transports.kafka import KafkaTransport

    wait = query.get("fetch_max_wait_ms", ["20"])[-1]
    if not wait.isdigit():
        raise ValueError("kafka:// URL: fetch_max_wait_ms must be a non-negative integer")
    session = query.get("session_timeout_ms", ["10000"])[-1]
    if not session.isdigit() or int(session) < 1000:
        raise ValueError("kafka:// URL: session_timeout_ms must be an integer >= 1000")
    return KafkaTransport(
        ",".join(hosts),
        options,
        partitions=int(partitions),
        fetch_max_wait_ms=int(wait),
        session_timeout_ms=int(session),
    )


def _mqtt(url: str, scheme: str, options: TransportOptions) -> MqttTransport:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"{scheme}:// URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{scheme}:// URL needs a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// URL takes no path, query or fragment")
    security = options.security
    if scheme == "mqtt" and security.tls.given:
        raise ValueError("TLS files are set but the URL is mqtt://: use mqtts://")
    username = security.username
    password = security.password
    if username is None and parts.username is not None:
        username = unquote(parts.username)
        password = password if parts.password is None else unquote(parts.password)
    return MqttTransport(
        parts.hostname,
        port,
        options,
        username=username,
        password=password,
        ssl_context=security.tls.context() if scheme == "mqtts" else None,
    )
