"""inference-worker's client: request/response over MQTT or Kafka, and the wire codec.

Install it alone (``pip install inference-worker-client``; ``[kafka]`` for Kafka) to talk
to a fleet of workers without installing the worker. The wire format is documented for
client authors in the repository's ``docs/wire.md``; this package is its reference codec.
"""

from inference_worker_client.client import InferenceClient, Reply, SyncInferenceClient
from inference_worker_client.protocol import (
    Codec,
    ErrorCode,
    ErrorInfo,
    Limits,
    ProtocolError,
    Request,
    Response,
    Timing,
    WireCodec,
)
from inference_worker_client.tls import TlsOptions

__all__ = [
    "Codec",
    "ErrorCode",
    "ErrorInfo",
    "InferenceClient",
    "Limits",
    "ProtocolError",
    "Reply",
    "Request",
    "Response",
    "SyncInferenceClient",
    "Timing",
    "TlsOptions",
    "WireCodec",
]
