"""Wire format v1, as the worker uses it: the codec lives in the client distribution
(``inference_worker_client.protocol``), so a client and the worker can never disagree on
the bytes, and a client can be installed without the worker. Every name and submodule
that was here is re-exported unchanged (``inference_worker.protocol.codec`` and so on).
"""

from inference_worker_client.protocol import *  # noqa: F403
from inference_worker_client.protocol import __all__ as __all__
