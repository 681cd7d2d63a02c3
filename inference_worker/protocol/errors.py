"""Re-export of :mod:`inference_worker_client.protocol.errors` (see the package docstring)."""

from inference_worker_client.protocol.errors import *  # noqa: F403
