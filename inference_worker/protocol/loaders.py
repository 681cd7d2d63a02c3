"""Re-export of :mod:`inference_worker_client.protocol.loaders` (see the package docstring)."""

from inference_worker_client.protocol.loaders import *  # noqa: F403
