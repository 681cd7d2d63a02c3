"""The client on the worker's own transports (``memory://`` included).

The client itself lives in the light ``inference-worker-client`` distribution
(:mod:`inference_worker_client`), which a backend service installs without the worker.
This module is that client with one difference: ``connect()`` builds the worker's
transports (:func:`inference_worker.transports.connect`), so the worker's tests, the demo
and ``inference-worker send`` can use an in-process ``memory://`` broker and a whole
:class:`~inference_worker.security.TransportSecurity` (Kafka SASL/SSL settings).
"""

from __future__ import annotations

from typing import Any

from inference_worker_client.client import InferenceClient as LightInferenceClient
from inference_worker_client.client import Reply, reply_address
from inference_worker_client.client import SyncInferenceClient as LightSyncInferenceClient

from inference_worker.security import TlsOptions, TransportSecurity
from inference_worker.transports import connect as connect_transport
from inference_worker.transports.base import TransportOptions
from inference_worker.transports.memory import MemoryBroker

__all__ = ["InferenceClient", "Reply", "SyncInferenceClient"]


class InferenceClient(LightInferenceClient):
    """:class:`inference_worker_client.InferenceClient` whose ``connect()`` builds the
    worker's transports."""

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        memory: MemoryBroker | None = None,
        client_id: str | None = None,
        response_topic: str = "response_message",
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
        security: TransportSecurity | None = None,
        **kwargs: Any,
    ) -> InferenceClient:
        """A client on `url` (memory://, mqtt[s]://, kafka://), not started yet.

        Credentials and TLS: `username`/`password` (they win over the URL's) and the
        `tls_*` PEM files (mqtts://: CA that signed the broker certificate, else the
        system CAs; client certificate + key for mutual TLS), or a whole `security`
        (also for Kafka SASL/SSL; then the other security arguments must stay unset).
        """
        if security is None:
            tls = TlsOptions(tls_ca_file, tls_cert_file, tls_key_file)
            security = TransportSecurity(username=username, password=password, tls=tls)
        elif username or password or tls_ca_file or tls_cert_file or tls_key_file:
            raise ValueError("pass either security= or username/password/tls_* arguments")
        client_id, reply_to = reply_address(client_id, response_topic, kwargs.get("app"))
        options = TransportOptions(
            client_id=client_id, subscriptions=(reply_to,), security=security
        )
        return cls(connect_transport(url, options, memory=memory), reply_to=reply_to, **kwargs)


class SyncInferenceClient(LightSyncInferenceClient):
    """The blocking wrapper, on the worker's transports."""

    client_class = InferenceClient
