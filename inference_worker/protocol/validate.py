"""Re-export of :mod:`inference_worker_client.protocol.validate` (see the package docstring)."""

from inference_worker_client.protocol.validate import *  # noqa: F403
