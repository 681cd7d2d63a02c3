"""Re-export of :mod:`inference_worker_client.protocol.dtypes` (see the package docstring)."""

from inference_worker_client.protocol.dtypes import *  # noqa: F403
