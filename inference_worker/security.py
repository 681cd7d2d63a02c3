"""Transport security shared by the broker transports, the client and the Redis store.

Secrets (passwords) come from a setting, an environment variable (`IW_<SECTION>__PASSWORD`)
or better a file (`*_password_file`, read at startup, trailing newline stripped); they
are kept out of `repr`, logs and error messages. TLS is client-side only here: a CA
bundle to verify the server (system CAs when none is given), optionally a client
certificate and key (mutual TLS); TLS 1.2 or newer, hostname verification on.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from inference_worker_client.tls import TlsOptions as TlsOptions  # re-exported

if TYPE_CHECKING:
    from inference_worker.settings import BrokerSettings, StateSettings

KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")


@dataclass(frozen=True)
class TransportSecurity:
    """Credentials and TLS for a broker connection (`TransportOptions.security`).

    `username`/`password` win over credentials in the URL. `tls` applies to `mqtts://`
    and to Kafka `SSL`/`SASL_SSL`; `kafka_protocol`/`sasl_mechanism` only to Kafka.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions = field(default_factory=TlsOptions)
    kafka_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"

    def __post_init__(self) -> None:
        if self.kafka_protocol not in KAFKA_PROTOCOLS:
            raise ValueError(
                f"Kafka security_protocol {self.kafka_protocol!r}: use one of {KAFKA_PROTOCOLS}"
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(
                f"Kafka sasl_mechanism {self.sasl_mechanism!r}: use one of {SASL_MECHANISMS}"
            )

    def kafka_kwargs(self) -> dict[str, Any]:
        """The security keyword arguments of aiokafka's consumer, producer and admin."""
        protocol = self.kafka_protocol
        if protocol == "PLAINTEXT":
            if self.tls.given or self.username or self.password:
                raise ValueError(
                    "Kafka TLS files or credentials are set but security_protocol is "
                    "PLAINTEXT: set it to SSL, SASL_SSL or SASL_PLAINTEXT"
                )
            return {"security_protocol": "PLAINTEXT"}
        out: dict[str, Any] = {"security_protocol": protocol}
        if protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            self.tls.check()
            try:
                ctx = create_ssl_context(
                    cafile=self.tls.ca_file or None,
                    certfile=self.tls.cert_file or None,
                    keyfile=self.tls.key_file or None,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load Kafka TLS files: {exc}") from exc
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # check_hostname is on already
            out["ssl_context"] = ctx
        elif self.tls.given:
            raise ValueError(f"Kafka TLS files are set but security_protocol is {protocol}")
        if protocol.startswith("SASL_"):
            if not self.username or self.password is None:
                raise ValueError(f"Kafka {protocol} needs a username and a password")
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.username
            out["sasl_plain_password"] = self.password
        return out


def redis_kwargs(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `redis.asyncio.Redis.from_url(url, ...)`: the ACL user and, for
    `rediss://`, TLS ≥ 1.2 with the server certificate and hostname checked."""
    tls = tls or TlsOptions()
    tls.check()
    scheme = url.partition("://")[0].lower()
    if tls.given and scheme != "rediss":
        raise ValueError("Redis TLS files are set but the state URL is not rediss://")
    out: dict[str, Any] = {}
    if username is not None:
        out["username"] = username
    if password is not None:
        out["password"] = password
    if scheme == "rediss":
        out.update(
            ssl_ca_certs=tls.ca_file or None,
            ssl_certfile=tls.cert_file or None,
            ssl_keyfile=tls.key_file or None,
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_min_version=ssl.TLSVersion.TLSv1_2,
        )
    return out


def read_secret(value: str, path: str, what: str) -> str:
    """The secret in file `path` (trailing newline stripped) when given, else `value`.

    Errors name the setting and the file, never its content.
    """
    if not path:
        return value
    if value:
        raise ValueError(f"{what}: set the password or the password file, not both")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read password file {path}: {exc}") from exc
    return text.rstrip("\r\n")


def broker_security(broker: BrokerSettings) -> TransportSecurity:
    """The `broker` settings' credentials and TLS (reads the password file now)."""
    password = read_secret(broker.password, broker.password_file, "broker.password_file")
    return TransportSecurity(
        username=broker.username or None,
        password=password or None,
        tls=TlsOptions(broker.tls_ca_file, broker.tls_cert_file, broker.tls_key_file),
        kafka_protocol=broker.security_protocol.upper(),
        sasl_mechanism=broker.sasl_mechanism.upper(),
    )


def state_security(state: StateSettings) -> dict[str, Any]:
    """Keyword arguments of `open_state` from the `state` settings (reads the file now)."""
    password = read_secret(state.password, state.password_file, "state.password_file")
    return {
        "username": state.username or None,
        "password": password or None,
        "tls": TlsOptions(state.tls_ca_file, state.tls_cert_file, state.tls_key_file),
    }


def redact_url(url: str) -> str:
    """The URL without its password, fit for error messages, logs and reprs (the one
    redactor: settings, the state store and the app all use it)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    # The hosts as written (several for a Redis Cluster URL, `h1:p1,h2:p2`, which
    # `parts.port` cannot parse; IPv6 brackets kept).
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
