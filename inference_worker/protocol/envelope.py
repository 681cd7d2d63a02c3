"""Re-export of :mod:`inference_worker_client.protocol.envelope` (see the package docstring)."""

from inference_worker_client.protocol.envelope import *  # noqa: F403
