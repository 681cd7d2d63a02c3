"""Compute: one batch in the model's pool — stack, infer, split, encode.

Runs in the model's bounded thread pool, never on the event loop; the whole batch is one
hand-off there and one back. Responses are encoded here, per batch, with a codec owned
by the pool thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference_worker.pipeline.jobs import Job
from inference_worker.protocol import Codec, Limits, Response, Timing, WireCodec
from inference_worker.serving import ServedModel


@dataclass(frozen=True)
class Computed:
    payloads: list[bytes]  # one encoded response per job, in order
    compute_s: float  # the model call alone


class BatchComputer:
    """Stateless apart from one WireCodec per pool thread."""

    def __init__(self, limits: Limits, worker: str, codec_for: Callable[[Codec], Codec]) -> None:
        self._limits = limits
        self._worker = worker
        self._codec_for = codec_for
        self._local = threading.local()

    def __call__(self, served: ServedModel, jobs: Sequence[Job], dispatched: float) -> Computed:
        names = [spec.name for spec in served.config.inputs]
        if len(jobs) == 1:
            stacked = {n: jobs[0].request.inputs[n] for n in names}
        else:
            stacked = {n: np.concatenate([j.request.inputs[n] for j in jobs]) for n in names}
        started = time.monotonic()
        outputs = served.runner.run(stacked)
        compute_s = time.monotonic() - started
        compute_ms = round(compute_s * 1000.0, 3)
        codec = self._codec()
        payloads: list[bytes] = []
        offset = 0
        for job in jobs:
            end = offset + job.rows
            resp = Response(
                id=job.request.id,
                status="ok",
                app=job.request.app,
                model=served.config.name,
                version=served.version,
                outputs={k: v[offset:end] for k, v in outputs.items()},
                meta=job.request.meta,
                timing=Timing(
                    round((dispatched - job.received_at) * 1000.0, 3), compute_ms, len(jobs)
                ),
                worker=self._worker,
            )
            payloads.append(codec.encode_response(resp, self._codec_for(job.request.codec)))
            offset = end
        return Computed(payloads, compute_s)

    def _codec(self) -> WireCodec:
        codec: WireCodec | None = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = WireCodec(self._limits)
        return codec
