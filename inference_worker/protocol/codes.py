"""Re-export of :mod:`inference_worker_client.protocol.codes` (see the package docstring)."""

from inference_worker_client.protocol.codes import *  # noqa: F403
