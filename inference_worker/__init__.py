"""inference-worker: serve ML models over publish/subscribe with Redis idempotency."""

__version__ = "0.1.0"
