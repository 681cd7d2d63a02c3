"""Re-export of :mod:`inference_worker_client.protocol.tensors` (see the package docstring)."""

from inference_worker_client.protocol.tensors import *  # noqa: F403
