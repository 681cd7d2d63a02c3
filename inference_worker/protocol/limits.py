"""Re-export of :mod:`inference_worker_client.protocol.limits` (see the package docstring)."""

from inference_worker_client.protocol.limits import *  # noqa: F403
