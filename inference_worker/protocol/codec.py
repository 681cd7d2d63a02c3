"""Re-export of :mod:`inference_worker_client.protocol.codec` (see the package docstring)."""

from inference_worker_client.protocol.codec import *  # noqa: F403
