"""What a worker is built from: one object instead of a long constructor.

`app.run_worker` fills it from settings; tests and the demo fill it by hand (memory
transport and state). Frozen: a worker's parts do not change while it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from inference_worker.auth import Authenticator
from inference_worker.metrics import Metrics
from inference_worker.quota import Quota
from inference_worker.serving import ServedModel
from inference_worker.settings import Settings
from inference_worker.state.base import StateStore
from inference_worker.transports.base import Transport


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Assembly:
    settings: Settings
    transport: Transport
    state: StateStore
    models: Sequence[ServedModel]
    name: str
    metrics: Metrics = field(default_factory=Metrics)
    auth: Authenticator | None = None
    quota: Quota | None = None
    weights: Mapping[str, int] = field(default_factory=dict)  # app -> batch share
    clock: Callable[[], float] = time.monotonic
    wall_ms: Callable[[], int] = _wall_ms
